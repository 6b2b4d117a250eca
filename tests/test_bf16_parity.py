"""bf16 parity with transformers in bf16: each math module at the real model's widths, then the
whole model (logits and greedy tokens) on a model wide enough for bf16 rounding to show.

Comparing af3 bf16 with af3 fp32 cannot see a dropped fp32 upcast (the difference hides inside
any tolerance loose enough for bf16); comparing with transformers in the same dtype can: both
sides round at the same places, so the module outputs agree bit for bit.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import af3.attention
from af3.attention import additive_mask, attention, repeat_kv
from af3.encoder import EncoderLayer, layer_norm
from af3.projector import Projector
from af3.qwen2 import DecoderAttention, RMSNorm, apply_rope, causal_mask, rope_cos_sin
from tests.devices import DEVICES, needs_cuda
from tests.model_helpers import TINY_AUDIO_ID, hf_to_af3_model, tiny_hf_model

BF16 = torch.bfloat16
# Qwen2.5-7B (AF3's decoder) and Whisper-large-v3 (its encoder).
TEXT = {"hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4, "rope_theta": 1e6,
        "rms_norm_eps": 1e-6}
AUDIO = {"d_model": 1280, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120}
HEAD_DIM = 128


def randn(*shape, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def noisy_(module: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Every parameter gets noise, so no bias sits at 0 and no gain at 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def assert_bits_equal(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype == BF16
    diff = (ours.float() - theirs.float()).abs().max().item()
    assert torch.equal(ours, theirs), f"bf16 outputs differ by up to {diff}"


def assert_bf16_rounding_apart(ours: torch.Tensor, theirs: torch.Tensor, max_steps: float,
                               max_fraction: float) -> None:
    """Every element within `max_steps` bf16 steps at the tensor's largest magnitude (an element
    near 0 may come from cancellation, so its own step size says nothing), and at most
    `max_fraction` of the elements differ at all."""
    assert ours.dtype == theirs.dtype == BF16
    scale = theirs.float().abs().max()
    steps = (ours.float() - theirs.float()).abs() / torch.exp2(torch.floor(torch.log2(scale)) - 7)
    fraction = (ours != theirs).float().mean().item()
    assert steps.max() <= max_steps and fraction <= max_fraction, (
        f"up to {steps.max().item()} bf16 steps (at |x| = {scale.item()}) apart, {fraction:.2%} of elements differ")


# --------------------------------------------------------------------------------------------
# Modules at the real widths.

def test_rmsnorm_bf16_equals_qwen2():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    d = TEXT["hidden_size"]
    theirs = noisy_(Qwen2RMSNorm(d, eps=1e-6), scale=0.1).to(BF16)
    ours = RMSNorm(d, 1e-6).to(BF16)
    ours.load_state_dict(theirs.state_dict())
    # Residual-stream scale: values up to ~100, where bf16 squares lose most of their bits.
    x = (randn(2, 7, d, seed=1) * 30).to(BF16)
    assert_bits_equal(ours(x), theirs(x))


def test_layer_norm_bf16_equals_torch_layer_norm():
    d = AUDIO["d_model"]
    norm = noisy_(torch.nn.LayerNorm(d, eps=1e-5), scale=0.1).to(BF16)
    x = (randn(2, 9, d, seed=2) * 20 + 3).to(BF16)  # an offset: the mean matters
    # af3 upcasts explicitly, torch's bf16 kernel accumulates in fp32 inside: at most one step apart.
    assert_bf16_rounding_apart(layer_norm(x, norm), norm(x), max_steps=1, max_fraction=0.01)


@pytest.mark.parametrize("affine", [{"elementwise_affine": False}, {"bias": False}], ids=["no-weight", "no-bias"])
def test_layer_norm_without_weight_or_bias_equals_torch(affine):
    """af3's fp32 LayerNorm takes any nn.LayerNorm, also one without a gain or without a bias, and
    uses the norm's own eps (0.5 against a variance of about 0.1: the eps matters)."""
    norm = noisy_(torch.nn.LayerNorm(16, eps=0.5, **affine), scale=0.1)
    x = randn(2, 5, 16, seed=2) * 0.3 + 3
    torch.testing.assert_close(layer_norm(x, norm), norm(x), rtol=0, atol=1e-5)


def test_rope_bf16_equals_qwen2():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import (
        Qwen2RotaryEmbedding,
        apply_rotary_pos_emb,
    )

    config = Qwen2Config(**TEXT)
    rotary = Qwen2RotaryEmbedding(config)
    positions = torch.tensor([[0, 1, 2, 37, 1000, 4095, 30000], [5, 6, 7, 8, 9, 10, 11]])
    q = randn(2, 28, 7, HEAD_DIM, seed=3).to(BF16)
    k = randn(2, 4, 7, HEAD_DIM, seed=4).to(BF16)
    cos_h, sin_h = rotary(q, positions)
    cos, sin = rope_cos_sin(positions, HEAD_DIM, TEXT["rope_theta"], BF16)
    assert_bits_equal(cos[:, 0], cos_h)  # (B, 1, T, hd): broadcast over heads
    half = HEAD_DIM // 2
    assert_bits_equal(sin[:, 0], torch.cat((-sin_h[..., :half], sin_h[..., half:]), dim=-1))  # signed (rotate_half's)
    q_h, k_h = apply_rotary_pos_emb(q, k, cos_h, sin_h)
    assert_bits_equal(apply_rope(q, cos, sin), q_h)
    assert_bits_equal(apply_rope(k, cos, sin), k_h)


@pytest.fixture(scope="module")
def qwen2_attention():
    """transformers' Qwen2Attention at Qwen2.5-7B's widths (bf16, SDPA) and af3's twin."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import (
        Qwen2Attention,
        Qwen2RotaryEmbedding,
    )

    config = Qwen2Config(**TEXT, attn_implementation="sdpa")
    theirs = noisy_(Qwen2Attention(config, layer_idx=0), seed=5).to(BF16).eval()
    ours = DecoderAttention(SimpleNamespace(num_attention_heads=28, num_key_value_heads=4, head_dim=HEAD_DIM,
                                            hidden_size=TEXT["hidden_size"]), layer_idx=0).to(BF16)
    ours.load_state_dict({name.replace("_proj", ""): t for name, t in theirs.state_dict().items()}, strict=True)
    return theirs, ours, Qwen2RotaryEmbedding(config)


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "plain-math"])
def test_decoder_attention_bf16_equals_qwen2(qwen2_attention, use_sdpa):
    theirs, ours, rotary = qwen2_attention
    t = 6
    x = randn(2, t, TEXT["hidden_size"], seed=6).to(BF16)
    positions = torch.arange(t)[None].expand(2, t)
    cos, sin = rope_cos_sin(positions, HEAD_DIM, TEXT["rope_theta"], BF16)
    ours.use_sdpa = use_sdpa
    with torch.no_grad():
        # No padding: plain causal attention on both sides.
        expected, _ = theirs(x, rotary(x, positions), attention_mask=None)
        got = ours(x, cos, sin, None, None, None)
        # Left padding in row 1: the same boolean mask for both.
        real = torch.tensor([[1] * t, [0, 0] + [1] * (t - 2)])  # (B, T): row 1 left-padded
        mask = causal_mask(real, torch.arange(t), t)
        real = real.bool()  # query rows that are real tokens
        expected_pad, _ = theirs(x, rotary(x, positions), attention_mask=mask)
        got_pad = ours(x, cos, sin, mask, None, None)
    if use_sdpa:  # the same kernel on the same bf16 tensors: bit for bit
        assert_bits_equal(got, expected)
        assert_bits_equal(got_pad[real], expected_pad[real])
    else:  # af3's plain math rounds the probabilities to bf16 before the product, SDPA does not
        for mine, ref in ((got, expected), (got_pad[real], expected_pad[real])):
            # Measured: max |diff| 0.031 at outputs up to 6.5, mean 0.0024 (a few bf16 steps).
            scale = ref.float().abs().max().item()
            diff = (mine.float() - ref.float()).abs()
            assert diff.max() <= scale * 2**-6 and diff.mean() <= scale * 2**-9, (
                f"max {diff.max().item()}, mean {diff.mean().item()}, scale {scale}")


def test_repeat_kv_equals_qwen2s():
    from transformers.models.qwen2.modeling_qwen2 import repeat_kv as hf_repeat_kv

    k = randn(2, 4, 5, HEAD_DIM, seed=14).to(BF16)
    assert_bits_equal(repeat_kv(k, 7), hf_repeat_kv(k, 7))
    assert repeat_kv(k, 1) is k


def test_sdpa_without_native_gqa_equals_native(monkeypatch):
    """torch < 2.5 has no enable_gqa: the keys and values are repeated instead (same result)."""
    q = randn(2, 28, 6, HEAD_DIM, seed=15).to(BF16)
    k, v = randn(2, 4, 9, HEAD_DIM, seed=16).to(BF16), randn(2, 4, 9, HEAD_DIM, seed=17).to(BF16)
    mask = torch.arange(9)[None, None, None, :] < torch.tensor([9, 5])[:, None, None, None]  # (B, 1, 1, 9)
    native = attention(q, k, v, mask, scale=HEAD_DIM**-0.5)
    monkeypatch.setattr(af3.attention, "_SDPA_GQA", False)
    assert_bits_equal(attention(q, k, v, mask, scale=HEAD_DIM**-0.5), native)


@pytest.mark.parametrize("tq, keys, masked", [(1, 1040, True), (3, 3, False), (4, 500, True)],
                         ids=["decode-step", "short-causal", "four-rows"])
def test_few_query_rows_on_the_cpu_are_fp32_math_not_sdpa(monkeypatch, tq, keys, masked):
    """A decoding step's attention on the CPU (at most FEW_ROWS query rows) is written out in fp32
    in half precision (SDPA is ten times slower for such rows in bf16) and under torch.compile
    (where inductor fuses it). fp32: SDPA's result to float precision. bf16: at least as close
    to the exact (fp32) result as SDPA's bf16 kernel, and at most one bf16 step from it: af3
    deliberately differs from transformers here (README, "bf16")."""
    import torch.nn.functional as F

    sdpa, calls = F.scaled_dot_product_attention, []
    q, k, v = randn(2, 28, tq, HEAD_DIM, seed=20), randn(2, 4, keys, HEAD_DIM, seed=21), \
        randn(2, 4, keys, HEAD_DIM, seed=22)
    mask = None
    if masked:  # row 1 left-padded, and the queries see keys up to their own slot
        mask = (torch.arange(keys)[None, :] <= torch.arange(keys - tq, keys)[:, None])[None, None].repeat(2, 1, 1, 1)
        mask[1, ..., :keys // 3] = False
    kw = {"attn_mask": mask, "is_causal": not masked, "scale": HEAD_DIM**-0.5, "enable_gqa": True}
    exact = sdpa(q, k, v, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k))
    for m in (mask, None if mask is None else additive_mask(mask, q.dtype)):
        calls.clear()
        torch.testing.assert_close(attention(q, k, v, m, scale=HEAD_DIM**-0.5, causal=not masked), exact,
                                   rtol=0, atol=2e-6)
        # eager fp32: SDPA, a masked step with each key/value head's 7 query heads as its rows
        assert calls == [(2, 4, 7 * tq, HEAD_DIM) if masked else q.shape]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the form torch.compile traces
    torch.testing.assert_close(attention(q, k, v, mask, scale=HEAD_DIM**-0.5, causal=not masked), exact,
                               rtol=0, atol=2e-6)
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k))
    q, k, v = q.to(BF16), k.to(BF16), v.to(BF16)
    mine, theirs = attention(q, k, v, mask, scale=HEAD_DIM**-0.5, causal=not masked), sdpa(q, k, v, **kw)
    assert not calls
    exact = sdpa(q.float(), k.float(), v.float(), **kw)
    assert (mine.float() - exact).abs().max() <= (theirs.float() - exact).abs().max()
    assert_bf16_rounding_apart(mine, theirs, max_steps=1, max_fraction=0.5)


def test_few_query_rows_keep_float64(monkeypatch):
    """The written-out decoding attention computes in fp32 or wider: float64 stays float64."""
    import torch.nn.functional as F

    q, k, v = (randn(*shape, seed=seed).double() for shape, seed in (((1, 4, 1, 8), 23), ((1, 2, 5, 8), 24),
                                                                       ((1, 2, 5, 8), 25)))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    mine = attention(q, k, v, None, scale=0.3)
    assert mine.dtype == torch.float64
    torch.testing.assert_close(mine, F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True),
                               rtol=0, atol=1e-12)


def test_encoder_layer_bf16_equals_transformers():
    """LayerNorms, attention (q scaled before the product, k without bias) and GELU MLP of one
    Whisper-large-v3 block, with keys past a window's valid length masked."""
    from transformers import AudioFlamingo3EncoderConfig
    from transformers.models.audioflamingo3.modeling_audioflamingo3 import (
        AudioFlamingo3EncoderLayer,
    )

    config = AudioFlamingo3EncoderConfig(**AUDIO, attn_implementation="sdpa")
    theirs = noisy_(AudioFlamingo3EncoderLayer(config), seed=7).to(BF16).eval()
    ours = EncoderLayer(SimpleNamespace(hidden_size=1280, num_attention_heads=20, head_dim=64,
                                        intermediate_size=5120, layer_norm_eps=1e-5)).to(BF16)
    names = {"self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
             "self_attn.out_proj": "attn.o", "self_attn_layer_norm": "attn_norm", "final_layer_norm": "mlp_norm",
             "fc1": "fc1", "fc2": "fc2"}
    state = {}
    for name, tensor in theirs.state_dict().items():
        module, leaf = name.rsplit(".", 1)
        state[f"{names[module]}.{leaf}"] = tensor
    ours.load_state_dict(state, strict=True)
    t = 10
    x = (randn(2, t, 1280, seed=8) * 4).to(BF16)
    keys = torch.arange(t)[None] < torch.tensor([[t], [7]])  # window 1 has 7 valid positions
    mask = keys[:, None, None, :]  # (B, 1, 1, T)
    with torch.no_grad():
        expected = theirs(x, attention_mask=mask)
        expected = expected[0] if isinstance(expected, tuple) else expected
        got = ours(x, mask)
    # torch's bf16 LayerNorm kernel and af3's fp32 one occasionally round an element one step
    # apart (seen: none in most runs, 1% in some); that step can carry through fc1/fc2.
    assert_bf16_rounding_apart(got, expected, max_steps=4, max_fraction=0.05)


def test_encoder_layer_fp16_clamps_overflow_as_transformers():
    """In fp16 a block's output is clamped to +-(65504 - 1000), as in Whisper and transformers, so
    activations that would overflow stay finite; in fp32 nothing is clamped."""
    from transformers import AudioFlamingo3EncoderConfig
    from transformers.models.audioflamingo3.modeling_audioflamingo3 import (
        AudioFlamingo3EncoderLayer,
    )

    d = 16
    config = AudioFlamingo3EncoderConfig(d_model=d, encoder_attention_heads=2, encoder_ffn_dim=32,
                                         attn_implementation="eager")
    theirs = noisy_(AudioFlamingo3EncoderLayer(config), seed=3, scale=0.2).eval()
    ours = EncoderLayer(SimpleNamespace(hidden_size=d, num_attention_heads=2, head_dim=8,
                                        intermediate_size=32, layer_norm_eps=1e-5))
    names = {"self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
             "self_attn.out_proj": "attn.o", "self_attn_layer_norm": "attn_norm", "final_layer_norm": "mlp_norm",
             "fc1": "fc1", "fc2": "fc2"}
    ours.load_state_dict({f"{names[n.rsplit('.', 1)[0]]}.{n.rsplit('.', 1)[1]}": t
                          for n, t in theirs.state_dict().items()})
    x = randn(1, 6, d, seed=4).sign() * 65000  # the residual stream at the edge of fp16's range
    for dtype in (torch.float16, torch.float32):
        with torch.no_grad():
            expected = theirs.to(dtype)(x.to(dtype), attention_mask=None)
            expected = expected[0] if isinstance(expected, tuple) else expected
            got = ours.to(dtype)(x.to(dtype), None)
        assert torch.equal(got, expected)
        top = got.float().abs().max().item()
        clamped = torch.tensor(65504.0 - 1000, dtype=dtype).item()  # 64512 in fp16's 32-wide steps
        assert top == clamped if dtype == torch.float16 else top > clamped  # clamped in fp16 only


def test_projector_bf16_equals_transformers():
    from transformers.models.audioflamingo3.modeling_audioflamingo3 import (
        AudioFlamingo3MultiModalProjector,
    )

    config = SimpleNamespace(audio_config=SimpleNamespace(hidden_size=1280),
                             text_config=SimpleNamespace(hidden_size=3584), projector_bias=True,
                             projector_hidden_act="gelu")
    theirs = noisy_(AudioFlamingo3MultiModalProjector(config), seed=9).to(BF16)
    ours = Projector(SimpleNamespace(audio=SimpleNamespace(hidden_size=1280),
                                     text=SimpleNamespace(hidden_size=3584), projector_bias=True)).to(BF16)
    ours.load_state_dict({k.replace("_", ""): v for k, v in theirs.state_dict().items()}, strict=True)
    x = randn(3, 20, 1280, seed=10).to(BF16)
    with torch.no_grad():
        assert_bits_equal(ours(x), theirs(x))


def test_projector_without_bias_has_none_and_equals_transformers():
    """projector_bias=False (not AF3's setting, but a config field): no bias tensors at all."""
    from transformers.models.audioflamingo3.modeling_audioflamingo3 import (
        AudioFlamingo3MultiModalProjector,
    )

    config = SimpleNamespace(audio_config=SimpleNamespace(hidden_size=16), text_config=SimpleNamespace(hidden_size=32),
                             projector_bias=False, projector_hidden_act="gelu")
    theirs = noisy_(AudioFlamingo3MultiModalProjector(config), seed=12)
    ours = Projector(SimpleNamespace(audio=SimpleNamespace(hidden_size=16), text=SimpleNamespace(hidden_size=32),
                                     projector_bias=False))
    assert sorted(ours.state_dict()) == ["linear1.weight", "linear2.weight"]
    ours.load_state_dict({k.replace("_", ""): v for k, v in theirs.state_dict().items()}, strict=True)
    x = randn(2, 5, 16, seed=13)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# The whole model in bf16.

# Wide enough that bf16 rounding shows: at hidden size 256 a dropped fp32 upcast in RMSNorm
# changes most logits by one or more bf16 steps.
WIDE_TEXT = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
WIDE_AUDIO = {"d_model": 128, "encoder_attention_heads": 4, "encoder_ffn_dim": 256}


@pytest.fixture(scope="module")
def wide_bf16(tmp_path_factory):
    """transformers in bf16 the way users get it (save_pretrained, then from_pretrained(dtype=bf16):
    RoPE's inverse frequencies stay fp32) and af3's twin cast to bf16."""
    from transformers import AudioFlamingo3ForConditionalGeneration

    hf = tiny_hf_model(audio=WIDE_AUDIO, seed=4, **WIDE_TEXT)
    ours = hf_to_af3_model(hf).to(BF16)
    folder = tmp_path_factory.mktemp("wide-hf")
    hf.save_pretrained(folder)
    hf = AudioFlamingo3ForConditionalGeneration.from_pretrained(folder, dtype=BF16).eval()
    return hf, ours


def test_decoder_bf16_logits_bit_identical_to_transformers(wide_bf16):
    """Text only, one row left-padded: embeddings, RMSNorm, RoPE, GQA attention, SwiGLU and the
    head round exactly where Qwen2's do, so every logit is the same bf16 number."""
    hf, ours = wide_bf16
    ids = torch.tensor([[5, 6, 9, 30, 31, 40, 41, 42, 43, 44], [0, 0, 0, 11, 12, 13, 14, 15, 16, 17]])
    mask = torch.tensor([[1] * 10, [0, 0, 0] + [1] * 7])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # af3's positions count real tokens only
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        mine = ours(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert theirs[real].float().abs().max() > 1.0, "logits too small for bf16 rounding to show"
    assert_bits_equal(mine[real], theirs[real])


def multi_window_inputs():
    """A 45 s clip (two windows, the second half full) and an 8 s clip, left-padded."""
    from tests.test_generation import left_pad

    g = torch.Generator().manual_seed(11)
    feats = torch.randn(3, 128, 3000, generator=g).to(BF16)  # windows: clip 0, clip 0, clip 1
    fmask = torch.zeros(3, 3000, dtype=torch.long)
    fmask[0], fmask[1, :1500], fmask[2, :800] = 1, 1, 1
    sounds = [750 + 375, 200]  # (frames + 1) // 4 per window
    rows = [[5, 6, 9] + [TINY_AUDIO_ID] * sounds[0] + [7, 8], [11] + [TINY_AUDIO_ID] * sounds[1] + [7, 8, 40]]
    ids, mask = left_pad(rows)
    return ids, mask, feats, fmask


# With audio the encoder is not bit-identical: torch's bf16 LayerNorm kernel and af3's explicit
# fp32 LayerNorm round about 1% of elements one bf16 step apart, and af3 drops the padded tail
# of a short window before the attention (a different GEMM shape, so a different accumulation
# order). Measured on this model: max |diff| 0.031 (one bf16 step at |logit| 4..8), mean 0.005.
# The bounds leave 2x headroom; a real bug (a norm without its upcast, a sign) moves logits by
# far more, and the decoder's own exactness is checked bit for bit above.
WHOLE_MODEL_MAX_DIFF = 0.0625
WHOLE_MODEL_MEAN_DIFF = 0.01


def on_device(wide_bf16, device: str):
    """The fixture's two models and the multi-window inputs, on `device` (copies, off the CPU)."""
    hf, ours = wide_bf16
    inputs = multi_window_inputs()
    if device != "cpu":
        hf, ours = copy.deepcopy(hf).to(device), copy.deepcopy(ours).to(device)
        inputs = tuple(t.to(device) for t in inputs)
    return hf, ours, inputs


@pytest.mark.parametrize("device", DEVICES)
def test_whole_model_bf16_logits_with_multi_window_audio(wide_bf16, device):
    hf, ours, (ids, mask, feats, fmask) = on_device(wide_bf16, device)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, input_features=feats, input_features_mask=fmask).logits
        mine = ours(input_ids=ids, attention_mask=mask, input_features=feats, input_features_mask=fmask).logits
    assert mine.dtype == theirs.dtype == BF16
    real = mask.bool()
    diff = (mine[real].float() - theirs[real].float()).abs()
    assert theirs[real].float().abs().max() > 1.0, "logits too small for bf16 rounding to show"
    assert diff.max() <= WHOLE_MODEL_MAX_DIFF and diff.mean() <= WHOLE_MODEL_MEAN_DIFF, (
        f"max {diff.max().item()}, mean {diff.mean().item()}")


@pytest.mark.parametrize("device", DEVICES)
def test_whole_model_bf16_greedy_equals_transformers(wide_bf16, device):
    from af3.generation import generate

    hf, ours, (ids, mask, feats, fmask) = on_device(wide_bf16, device)
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    theirs = hf.generate(input_ids=ids, attention_mask=mask, input_features=feats, input_features_mask=fmask, **kw)
    mine = generate(ours, ids, mask, feats, fmask, **kw)
    assert torch.equal(mine, theirs)


@needs_cuda
def test_decoder_on_cuda_equals_cpu():
    """Masks and positions are made on the input's device (a mask left on the CPU fails on CUDA)."""
    model = hf_to_af3_model(tiny_hf_model(seed=4, **WIDE_TEXT))
    ids = torch.tensor([[5, 6, 9, 30, 31, 40], [0, 0, 11, 12, 13, 14]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = model.cuda()(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-4)


@needs_cuda
def test_encoder_with_short_windows_on_cuda_equals_cpu():
    """The encoder's key mask for short windows is made on the input's device (one left on the CPU
    fails on CUDA)."""
    from tests.test_model import make_batch

    model = hf_to_af3_model(tiny_hf_model(seed=4))
    batch = make_batch([[3000, 1001], [397]], seed=3)
    batch.pop("labels")
    with torch.no_grad():
        expected = model(**batch).logits
        got = model.cuda()(**{k: v.cuda() for k, v in batch.items()}).logits.cpu()
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-4)
