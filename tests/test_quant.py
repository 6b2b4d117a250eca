"""int8 / int4 weight-only quantization: packing, kernels, checkpoints, loading, the bundle.

Checkpoints are made the way users make theirs: transformers writes an HF checkpoint,
`weights_convert --quantize` converts it (or `af3.load(..., quantize=)` quantizes on the way in).
The tiny model here has hidden size 64 and MLP 128, so that every int4 group size up to 64 fits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import af3
from af3.config import AF3Config, ConfigError, QuantConfig
from af3.quant import (
    Int4Linear,
    Int8Linear,
    check_group_size,
    dequantize_int4,
    dequantize_int8,
    int4_ranges,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantize_weight,
    unpack_int4,
    weight_bytes,
)
from weights_convert.__main__ import main as convert_main
from weights_convert.convert import convert

DIMS = {"hidden_size": 64, "intermediate_size": 128}
GREEDY = {"do_sample": False, "max_new_tokens": 6}


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{"hf", "float", "int8", "int4"}: one tiny model, converted three ways (int4: group size 32)."""
    from tests.tiny_checkpoint import write_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("quant")
    write_tiny_hf_checkpoint(root / "hf", seed=0, **DIMS)
    convert(root / "hf", root / "float")
    convert(root / "hf", root / "int8", quantize="int8")
    assert convert_main([str(root / "hf"), str(root / "int4"), "--quantize", "int4", "--group-size", "32",
                         "--quiet"]) == 0
    return {k: root / k for k in ("hf", "float", "int8", "int4")}


def last_logits(bundle, seconds: float = 3.0, seed: int = 0) -> torch.Tensor:
    inputs = bundle.processor.apply_transcription_request(clip(seconds, seed))
    with torch.no_grad():
        return bundle.model(**inputs).logits[0, -1].float()


# ---- packing: property tests ------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 24), half_k=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_int4_pack_unpack_round_trip(n, half_k, seed):
    q = torch.randint(0, 16, (n, 2 * half_k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = pack_int4(q)
    assert packed.shape == (n, half_k) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(packed[:, 0] >> 4, q[:, 0])  # column 0 in the high nibble, as documented


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 24), k=st.integers(1, 200), log_scale=st.floats(-6, 2), seed=st.integers(0, 2**16))
def test_int8_round_trip_error_is_half_a_step(n, k, log_scale, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 10**log_scale
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (n,) and int(q.abs().max()) <= 127
    err = (dequantize_int8(q, scales) - w).abs()
    # Half a step, plus what rounding the scale to bf16 can push past the clamp at +-127.
    bound = 0.5 * scales.float()[:, None] + w.abs().amax(1, keepdim=True) * 2**-7
    assert bool((err <= bound).all())
    again, again_scales = quantize_int8(dequantize_int8(q, scales))  # quantizing the grid is exact
    assert torch.equal(dequantize_int8(again, again_scales), dequantize_int8(q, scales))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 20), groups=st.integers(1, 4), group_size=st.sampled_from([32, 64, 128]),
       log_scale=st.floats(-5, 1), shift=st.floats(-2, 2), outlier=st.floats(0, 20), seed=st.integers(0, 2**16))
def test_int4_round_trip_error(n, groups, group_size, log_scale, shift, outlier, seed):
    w = torch.randn(n, groups * group_size, generator=torch.Generator().manual_seed(seed)) + shift
    w[:, 0] += outlier  # one large weight per row: where clipping the range pays
    w *= 10**log_scale
    packed, scales, zeros = quantize_int4(w, group_size)
    assert packed.shape == (n, groups * group_size // 2) and scales.shape == zeros.shape == (n, groups)
    d = dequantize_int4(packed, scales, zeros, group_size)
    s = scales.float().repeat_interleave(group_size, 1)
    z = zeros.float().repeat_interleave(group_size, 1)
    # A weight inside its group's grid is within half a step of it, plus the bf16 rounding of
    # the zero and scale the grid is built from; one outside it sits on the nearest end level.
    first, last = z - 8 * s, z + 7 * s
    bound = 0.5 * s + 2**-7 * (z.abs() + 8 * s) + 1e-12
    inside = (w >= first) & (w <= last)
    assert bool(((d - w).abs() <= bound)[inside].all())
    nearest_end = torch.where(w < first, first, last)
    assert torch.allclose(d[~inside], nearest_end[~inside], rtol=1e-6, atol=1e-12)
    # The searched grid's squared error is never above that of the grid over [min, max] (RTN).
    rtn = dequantize_int4(*_rtn_int4(w, group_size), group_size)
    def group_error(x):
        return ((x - w) ** 2).reshape(n, groups, group_size).sum(-1)
    assert bool((group_error(d) <= group_error(rtn) * (1 + 1e-4) + 1e-30).all())
    # Blocked quantization (what conversion uses) gives the same bytes as one call.
    blocked = quantize_weight(w, QuantConfig("int4", group_size))
    assert torch.equal(blocked["weight"], packed) and torch.equal(blocked["zeros"], zeros)


def _rtn_int4(w, group_size):
    """Round to nearest over each group's [min, max]: int4 without the range search."""
    g = w.float().reshape(w.shape[0], -1, group_size)
    scales, zeros = int4_ranges(g, search=False)
    base = zeros.float() - 8 * scales.float()
    q = torch.round((g - base[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(w.shape)), scales, zeros


def test_int4_range_search_lowers_the_error_of_gaussian_weights():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    for group_size in (32, 64, 128):
        searched = dequantize_int4(*quantize_int4(w, group_size), group_size)
        rtn = dequantize_int4(*_rtn_int4(w, group_size), group_size)
        ratio = float(((searched - w) ** 2).mean() / ((rtn - w) ** 2).mean())
        assert ratio < 0.9, (group_size, ratio)  # measured: about 0.85 (bench_quant)


def test_bad_group_sizes_are_named():
    with pytest.raises(ValueError, match=r"group size 64 does not divide its 96 inputs; use one of \[32\]"):
        quantize_int4(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match=r"int4 group size must be one of \(32, 64, 128\), got 16"):
        quantize_int4(torch.randn(4, 64), 16)
    with pytest.raises(ConfigError, match="int4 group_size must be one of"):
        QuantConfig("int4", 100)
    with pytest.raises(ConfigError, match="scheme 'int3' is not one of int8, int4"):
        QuantConfig("int3")


# ---- kernels against dequantize-then-matmul ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k", "bias"), [(64, 128, True), (600, 64, False), (40, 96, True)])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_kernels_match_dequantize_then_matmul(scheme, n, k, bias, dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=bias)
    m = Int8Linear.from_float(linear) if scheme == "int8" else Int4Linear.from_float(linear, 32)
    w = m.dequantize()
    m.pack_for_kernel()
    if scheme == "int4":  # N = 40 has no CPU int4 kernel (N % 16): that layer dequantizes per call
        assert m.kernel == ("cpu" if n % 16 == 0 else None)
    x = torch.randn(2, 5, k).to(dtype)
    with torch.no_grad():
        got = m(x)
    assert got.dtype == dtype and got.shape == (2, 5, n)
    want = F.linear(x.float(), w, None if linear.bias is None else linear.bias.detach())
    rel = float((got.float() - want).norm() / want.norm())
    assert rel < 1e-2, rel  # bf16 activations inside the kernels
    # A wrong nibble order or group layout would be off by far more than that.
    wrong = F.linear(x.float(), w.roll(1, dims=1))
    assert float((got.float() - wrong).norm() / wrong.norm()) > 0.3


def test_kernels_take_activations_at_any_offset():
    # The CPU int8 kernel crashed on data not aligned to 32 bytes: a slice of a larger tensor.
    m = Int8Linear.from_float(torch.nn.Linear(48, 32))
    m.pack_for_kernel()
    buf = torch.randn(3 * 48 + 9).to(torch.bfloat16)
    for off in range(9):
        x = buf[off:off + 3 * 48].view(3, 48)
        want = F.linear(x.float(), m.dequantize(), m.bias.detach())
        with torch.no_grad():
            assert float((m(x).float() - want).norm() / want.norm()) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA int4 kernel "
                    "(_weight_int4pack_mm) and int8 dequantize path are not exercised on this machine")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_cuda_kernels_match_dequantize_then_matmul(scheme):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128).cuda()
    m = Int8Linear.from_float(linear) if scheme == "int8" else Int4Linear.from_float(linear, 64)
    w = m.dequantize()
    m.pack_for_kernel()
    if scheme == "int4":
        assert m.kernel == "cuda"
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x.float(), w, linear.bias.detach())
    assert float((m(x).float() - want).norm() / want.norm()) < 1e-2


# ---- checkpoints and loading ------------------------------------------------------------------

def test_converted_checkpoints_store_the_documented_tensors(ckpts):
    q8 = load_file(str(ckpts["int8"] / "model.safetensors"))
    q4 = load_file(str(ckpts["int4"] / "model.safetensors"))
    name = "decoder.layers.0.mlp.down"  # (64, 128)
    assert q8[f"{name}.weight"].dtype == torch.int8 and q8[f"{name}.weight"].shape == (64, 128)
    assert q8[f"{name}.scales"].dtype == torch.bfloat16 and q8[f"{name}.scales"].shape == (64,)
    assert q4[f"{name}.weight"].dtype == torch.uint8 and q4[f"{name}.weight"].shape == (64, 64)
    assert q4[f"{name}.scales"].shape == q4[f"{name}.zeros"].shape == (64, 4)
    for q in (q8, q4):  # what stays float
        for kept in ("decoder.embed_tokens.weight", "decoder.layers.0.attn.q.bias", "decoder.norm.weight",
                     "encoder.layers.0.fc1.weight", "projector.linear1.weight"):
            assert q[kept].dtype == torch.float32, kept
    assert "decoder.lm_head.scales" in q8 and "decoder.lm_head.zeros" in q4
    assert json.loads((ckpts["int8"] / "config.json").read_text())["quantization"] == {
        "scheme": "int8", "group_size": None}
    assert json.loads((ckpts["int4"] / "config.json").read_text())["quantization"] == {
        "scheme": "int4", "group_size": 32}
    # The weights equal what the module-level functions make from the float checkpoint.
    w = load_file(str(ckpts["float"] / "model.safetensors"))[f"{name}.weight"]
    assert torch.equal(q8[f"{name}.weight"], quantize_int8(w)[0])
    assert torch.equal(q4[f"{name}.weight"], quantize_int4(w, 32)[0])


def test_sizes_computed_from_the_config_are_the_files(ckpts):
    config = AF3Config.load(ckpts["int4"] / "config.json")
    want = sum(weight_bytes(config, config.quantization, torch.float32).values())
    assert want == _tensor_bytes(ckpts["int4"])
    config8 = AF3Config.load(ckpts["int8"] / "config.json")
    assert sum(weight_bytes(config8, config8.quantization, torch.float32).values()) == _tensor_bytes(ckpts["int8"])


def _tensor_bytes(folder) -> int:
    return sum(t.nbytes for t in load_file(str(folder / "model.safetensors")).values())


# Measured on this tiny random model: int8 0.99995, int4 (group size 32) 0.989-0.991.
@pytest.mark.parametrize(("scheme", "target"), [("int8", 0.9995), ("int4", 0.98)])
def test_converted_equals_quantized_on_load_and_stays_close_to_float(ckpts, scheme, target):
    float_bundle = af3.load(ckpts["float"])
    converted = af3.load(ckpts[scheme])
    on_load = af3.load(ckpts["float"], quantize=scheme, group_size=32 if scheme == "int4" else None)
    assert converted.config.quantization == on_load.config.quantization
    assert isinstance(converted.model.decoder.layers[1].attn.qkv, Int8Linear if scheme == "int8" else Int4Linear)
    for seconds, seed in ((3.0, 0), (8.0, 1)):
        ref, got = last_logits(float_bundle, seconds, seed), last_logits(converted, seconds, seed)
        assert torch.equal(got, last_logits(on_load, seconds, seed))
        cos = float(F.cosine_similarity(ref, got, dim=0))
        assert target <= cos < 1.0, cos


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantizing_merged_linears_in_memory_equals_quantizing_each_projection_on_load(ckpts, scheme):
    """quantize_model quantizes attn.qkv whole; af3.load(quantize=) quantizes q, k and v one by
    one as it reads them and joins the results. Scales per row (int8) and
    per group of a row's inputs (int4) make both the same tensors, so the same logits."""
    qc = QuantConfig(scheme, 32 if scheme == "int4" else None)
    in_memory = af3.load(ckpts["float"])
    quantize_model(in_memory.model, qc)
    assert isinstance(in_memory.model.decoder.layers[0].attn.qkv, Int8Linear if scheme == "int8" else Int4Linear)
    on_load = af3.load(ckpts["float"], quantize=scheme, group_size=qc.group_size)
    assert torch.equal(last_logits(in_memory), last_logits(on_load))


def test_int8_float_parts_follow_dtype(ckpts):
    m = af3.load(ckpts["int8"], dtype="bf16")
    assert m.dtype == torch.bfloat16 and m.model.decoder.embed_tokens.weight.dtype == torch.bfloat16
    assert m.model.decoder.layers[0].attn.qkv.weight.dtype == torch.int8
    assert m.model.decoder.layers[0].attn.qkv.scales.dtype == torch.bfloat16
    ref = last_logits(af3.load(ckpts["int8"]))
    assert float(F.cosine_similarity(ref, last_logits(m), dim=0)) > 0.999


def test_missing_scale_is_named(ckpts, tmp_path):
    bad = _copy(ckpts["int8"], tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["decoder.layers.1.attn.v.scales"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing: decoder\.layers\.1\.attn\.v\.scales"):
        af3.load(bad)


def test_float_weight_where_int8_is_expected_is_named(ckpts, tmp_path):
    bad = _copy(ckpts["int8"], tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["decoder.layers.0.mlp.up.weight"] = tensors["decoder.layers.0.mlp.up.weight"].float()
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"wrong dtype for its int8 quantization: decoder\.layers\.0\.mlp"
                                         r"\.up\.weight \(F32, wants int8\)"):
        af3.load(bad)


def test_quantized_tensors_without_the_config_entry_are_refused(ckpts, tmp_path):
    bad = _copy(ckpts["int4"], tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    del config["quantization"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected: decoder\.layers\.0\.attn\.k\.scales"):
        af3.load(bad)
    config["quantization"] = {"scheme": "int4", "group_size": 64, "bits": 4}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.quantization: unknown keys \['bits'\]"):
        af3.load(bad)


def test_no_silent_way_back(ckpts, tmp_path):
    with pytest.raises(ValueError, match="already quantized \\(int8\\); it cannot be converted again or "
                                         "back to floating point"):
        convert(ckpts["int8"], tmp_path / "back", dtype="fp32")
    assert not (tmp_path / "back").exists()
    with pytest.raises(ValueError, match=r"already quantized \(int4, group size 32\); it cannot be "
                                         r"quantized again to int8"):
        af3.load(ckpts["int4"], quantize="int8")
    same = af3.load(ckpts["int4"], quantize="int4", group_size=32)  # what it already is: fine
    assert same.config.quantization == QuantConfig("int4", 32)
    with pytest.raises(ValueError, match="packed in the cpu kernel's layout and cannot be saved"):
        same.model.state_dict()
    # Dequantizing is explicit: the layer gives the float weight it stands for.
    w = af3.load(ckpts["int8"]).model.decoder.layers[0].attn.o.dequantize()
    ref = load_file(str(ckpts["float"] / "model.safetensors"))["decoder.layers.0.attn.o.weight"]
    assert float((w - ref).abs().max()) <= float(ref.abs().max()) / 127


def test_load_arguments_are_checked(ckpts):
    with pytest.raises(ConfigError, match="scheme 'int3' is not one of int8, int4"):
        af3.load(ckpts["float"], quantize="int3")
    with pytest.raises(TypeError, match="quantize must be 'int8', 'int4' or None, got int"):
        af3.load(ckpts["float"], quantize=8)
    with pytest.raises(ValueError, match="group_size is for quantize='int4'"):
        af3.load(ckpts["float"], group_size=32)
    with pytest.raises(ConfigError, match="int8 has one scale per output channel"):
        af3.load(ckpts["float"], quantize="int8", group_size=32)


def test_a_group_size_that_does_not_fit_the_model_is_named(ckpts, tmp_path):
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.attn\.qkv: int4 group size 128 does not divide "
                                         r"its 64 inputs; use one of \[32, 64\]"):
        convert(ckpts["hf"], tmp_path / "q4", quantize="int4", group_size=128)
    assert not (tmp_path / "q4").exists()
    with pytest.raises(ValueError, match="its 48 inputs are not a multiple of any int4 group size"):
        check_group_size(32, 48, "decoder.layers.0.attn.q")


def test_cli_group_size_needs_int4(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        convert_main([str(tmp_path / "a"), str(tmp_path / "b"), "--group-size", "32"])
    assert e.value.code == 2
    assert "--group-size is for --quantize int4" in capsys.readouterr().err


def test_training_is_refused(ckpts):
    m = af3.load(ckpts["float"], quantize="int8")
    with pytest.raises(ValueError, match="holds int8 weights, which cannot be trained: load the float checkpoint"):
        m.model.train()


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---- the bundle and the examples --------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_every_bundle_call_runs_quantized(ckpts, scheme):
    m = af3.load(ckpts[scheme])
    audio = clip(2.0)
    text = m.transcribe(audio, **GREEDY)
    pieces: list[str] = []
    assert m.transcribe(audio, stream=pieces.append, **GREEDY) == text
    assert "".join(pieces).strip() == text  # the stream keeps the leading space transcribe strips
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": audio},
                                                 {"type": "text", "text": "Transcribe the input speech."}]}]
    assert m.chat(conversation, **GREEDY).strip() == text  # the same prompt as transcribe's
    assert [t.strip() for t in m.generate([conversation, conversation], **GREEDY)] == [text, text]
    session = m.start_chat(audio)
    first = session.ask("Transcribe the input speech.", **GREEDY)
    assert first.strip() == text
    assert isinstance(session.ask("And again?", **GREEDY), str)
    # The quantized model decodes what a float model with the dequantized weights would, up to
    # the bf16 activations inside the kernels: compare the tokens with the float checkpoint's.
    ref = af3.load(ckpts["float"])
    if scheme == "int8":
        assert ref.transcribe(audio, **GREEDY) == text


def test_examples_with_quantize(ckpts, capsys, tmp_path):
    import soundfile

    from tests.test_examples import example

    wav = tmp_path / "a.wav"
    soundfile.write(str(wav), clip(1.5), 16000)
    assert example("transcribe").main([str(wav), "--checkpoint", str(ckpts["float"]), "--quantize", "int8",
                                       "--greedy", "--max-new-tokens", "4"]) == 0
    out8 = capsys.readouterr().out
    assert example("transcribe").main([str(wav), "--checkpoint", str(ckpts["int8"]), "--greedy",
                                       "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == out8  # quantized on load == converted
    assert example("train_step").main([str(wav), "some words", "--checkpoint", str(ckpts["int4"])]) == 2
    err = capsys.readouterr().err
    assert "holds int4 weights, which cannot be trained" in err and "Traceback" not in err
