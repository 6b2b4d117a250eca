"""AudioFlamingo3 against transformers on tiny random configs, through the converter's name map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import af3.encoder
from af3.model import AudioFlamingo3
from tests.model_helpers import (
    TINY_AUDIO_ID,
    af3_config_of,
    hf_to_af3_model,
    tiny_hf_model,
)

N_FRAMES = 3000  # mel frames per window


def make_batch(windows: list[list[int]], *, seed: int = 0, padding_side: str = "left",
               text: tuple[int, int] = (4, 6)) -> dict[str, torch.Tensor]:
    """Inputs for samples whose audio windows have the given valid mel lengths.

    Each sample: `text[0]` random tokens, one <sound> per audio frame, `text[1]` random tokens,
    padded to the longest sample. Labels cover the text after the audio only.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = [L for sample in windows for L in sample]
    features = torch.randn(len(lengths), 128, N_FRAMES, generator=g)
    mask = (torch.arange(N_FRAMES)[None] < torch.tensor(lengths)[:, None]).to(torch.int32)
    rows, label_rows = [], []
    for i, sample in enumerate(windows):
        n_audio = sum((L + 1) // 4 for L in sample)
        pre = torch.randint(0, 150, (text[0] + i,), generator=g)  # rows differ in length
        post = torch.randint(0, 150, (text[1],), generator=g)
        rows.append(torch.cat([pre, torch.full((n_audio,), TINY_AUDIO_ID), post]))
        label_rows.append(torch.cat([torch.full((len(pre) + n_audio,), -100), post]))
    t = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    attn = torch.zeros(len(rows), t, dtype=torch.long)
    labels = torch.full((len(rows), t), -100)
    for i, (r, lab) in enumerate(zip(rows, label_rows)):
        s = slice(t - len(r), t) if padding_side == "left" else slice(0, len(r))
        ids[i, s], attn[i, s], labels[i, s] = r, 1, lab
    return {"input_ids": ids, "attention_mask": attn, "input_features": features,
            "input_features_mask": mask, "labels": labels}


def hf_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # transformers' forward counts positions 0..T-1 whatever the mask; its generate() derives them
    # from the mask like this, which is what af3 does by default.
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def assert_close_scaled(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    scale = max(1.0, ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= tol * scale, f"max abs diff {diff:.3g} > {tol} x scale {scale:.3g}"


# (text overrides, audio overrides): GQA ratios 1, 2, 4; tied and untied heads; several widths.
CONFIGS = {
    "mha-untied": ({"num_attention_heads": 4, "num_key_value_heads": 4}, {}),
    "gqa2-tied": ({"num_key_value_heads": 2, "tie_word_embeddings": True}, {}),
    "gqa4-wide": ({"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 8,
                   "num_key_value_heads": 2, "num_hidden_layers": 3, "rope_theta": 1e6},
                  {"d_model": 24, "encoder_attention_heads": 3, "encoder_layers": 1}),
}
# Windows per sample (valid mel frames): several windows, a short last one, one-window samples.
WINDOWS = [[3000, 1001], [397], [8]]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    text, audio = CONFIGS[request.param]
    hf = tiny_hf_model(audio=audio, seed=len(request.param), **text)
    return hf, hf_to_af3_model(hf)


@pytest.fixture(scope="module")
def batch():
    return make_batch(WINDOWS)


def test_parity_with_transformers(pair, batch) -> None:
    hf, ours = pair
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = hf(**batch, position_ids=hf_positions(batch["attention_mask"]))
        ref_enc = hf.model.audio_tower(batch["input_features"], batch["input_features_mask"]).last_hidden_state
        ref_audio = hf.get_audio_features(batch["input_features"], batch["input_features_mask"]).pooler_output
        out = ours(**batch)
        enc = ours.encoder(batch["input_features"], batch["input_features_mask"].sum(-1))
        audio = ours.get_audio_features(batch["input_features"], batch["input_features_mask"])
    pooled = (batch["input_features_mask"].sum(-1) + 1) // 4
    valid = torch.arange(ref_enc.shape[1])[None] < pooled[:, None]
    assert enc.shape[1] == 750  # a full window: nothing to cut
    assert_close_scaled(enc[valid[:, :enc.shape[1]]], ref_enc[valid])
    assert audio.shape == ref_audio.shape == (sum((L + 1) // 4 for w in WINDOWS for L in w),
                                              ours.config.text.hidden_size)
    assert_close_scaled(audio, ref_audio)
    # Padding positions carry no meaning (and differ between implementations) but must be finite.
    assert_close_scaled(out.logits[real], ref.logits[real])
    assert torch.isfinite(out.logits).all()
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * max(1.0, ref.loss.item())


def test_encoder_masked_batch_equals_windows_alone(pair, batch, monkeypatch) -> None:
    # The CPU runs windows of different lengths one at a time; other devices run them as one batch
    # with padded keys masked. Both must give transformers' valid frames (here both on the CPU).
    hf, ours = pair
    features, mask = batch["input_features"], batch["input_features_mask"]
    with torch.no_grad():
        ref = hf.get_audio_features(features, mask).pooler_output
        alone = ours.get_audio_features(features, mask)
        monkeypatch.setattr(af3.encoder, "_CPU_WINDOWS_ALONE", False)
        masked = ours.get_audio_features(features, mask)
    assert_close_scaled(alone, ref)
    assert_close_scaled(masked, ref)
    assert_close_scaled(masked, alone, 1e-5)


def test_math_attention_matches_sdpa(batch) -> None:
    ours = hf_to_af3_model(tiny_hf_model(num_key_value_heads=1))
    with torch.no_grad():
        fused = ours(**batch)
        ours.set_attention("math")
        math = ours(**batch)
    real = batch["attention_mask"].bool()
    assert torch.isfinite(math.logits).all()  # fully masked (left-padding) rows give no NaN
    assert_close_scaled(math.logits[real], fused.logits[real], 1e-5)
    assert abs(math.loss.item() - fused.loss.item()) <= 1e-5
    with pytest.raises(ValueError, match="'sdpa' or 'math'"):
        ours.set_attention("flash")


def test_right_padding_short_or_full_windows_and_text_only_parity(pair) -> None:
    hf, ours = pair
    ids = torch.randint(0, 150, (2, 7))
    with torch.no_grad():
        # Short windows only: the encoder works on the longest valid length, not all 1500 positions
        # (999 frames: 500 positions, the last of which sees mel frame 1000, a padding frame).
        # Full windows only: no key mask at all.
        for windows in ([[1201, 40], [64]], [[999, 40]], [[3000]]):
            b = make_batch(windows, padding_side="right", seed=3)
            real = b["attention_mask"].bool()
            assert_close_scaled(ours(**b).logits[real], hf(**b).logits[real])
        assert_close_scaled(ours(ids).logits, hf(input_ids=ids).logits)
        enc = ours.encoder(make_batch([[1201]])["input_features"], torch.tensor([1201]))
    assert enc.shape[1] == 301  # conv: 601 positions, cut to 602 (even), pooled to 301 (300 valid)


def test_left_padded_rows_equal_rows_alone(pair, batch) -> None:
    _, ours = pair
    with torch.no_grad():
        together = ours(**batch).logits
        first = 0
        for i, sample in enumerate(WINDOWS):
            real = batch["attention_mask"][i].bool()
            alone = ours(batch["input_ids"][i:i + 1, real],
                         input_features=batch["input_features"][first:first + len(sample)],
                         input_features_mask=batch["input_features_mask"][first:first + len(sample)]).logits
            first += len(sample)
            assert (together[i, real] - alone[0]).abs().max().item() <= 1e-5


def test_cached_decoding_equals_full_forward(pair) -> None:
    _, ours = pair
    batch = make_batch([[3000, 401], [97], [8]], seed=1, text=(4, 7))
    ids, attn = batch["input_ids"], batch["attention_mask"]
    t = ids.shape[1]
    prefill = t - 6
    for backend in ("sdpa", "math") if ours.config.text.n_rep == 4 else ("sdpa",):
        ours.set_attention(backend)
        with torch.no_grad():
            full = ours(**batch).logits
            cache = ours.new_cache(ids.shape[0], t + 4)
            k_ptr = cache.k[0].data_ptr()
            out = ours(ids[:, :prefill], attn[:, :prefill], batch["input_features"],
                       batch["input_features_mask"], cache=cache, input_pos=torch.arange(prefill))
            steps = [out.logits]
            for i in range(prefill, t):
                steps.append(ours(ids[:, i:i + 1], attn[:, :i + 1], cache=cache,
                                  input_pos=torch.tensor([i])).logits)
            cached = torch.cat(steps, dim=1)
            # A decoding step as generate runs it: static shapes, a mask of the filled slots over
            # every slot, no checks.
            filled = torch.zeros(ids.shape[0], t + 4, dtype=torch.long)
            filled[:, :t] = attn
            last = ours.decode_step(ids[:, -1:], filled, cache, torch.tensor([t - 1]), hf_positions(attn)[:, -1:])
        real = attn.bool()
        assert (cached[real] - full[real]).abs().max().item() <= 1e-5
        assert (last - full[:, -1:]).abs().max().item() <= 1e-5
        assert cache.k[0].data_ptr() == k_ptr  # written in place, never regrown
    ours.set_attention("sdpa")


def test_logits_to_keep(pair) -> None:
    _, ours = pair
    b = make_batch([[501], [97]], seed=2)
    del b["labels"]
    with torch.no_grad():
        full = ours(**b).logits
        last = ours(**b, logits_to_keep=2).logits
    assert last.shape[1] == 2
    assert torch.allclose(last, full[:, -2:], atol=1e-6, rtol=0)


def test_training_gradients_and_loss_match_transformers() -> None:
    hf = tiny_hf_model(seed=5)
    ours = hf_to_af3_model(hf)
    b = make_batch([[1600], [3000, 500]], seed=7)
    hf.train()
    ours.train()
    ref = hf(**b, position_ids=hf_positions(b["attention_mask"]))
    ref.loss.backward()
    out = ours(**b)
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * max(1.0, ref.loss.item())
    pairs = [(ours.encoder.conv1.weight, hf.model.audio_tower.conv1.weight),
             (ours.encoder.layers[0].attn.q.weight, hf.model.audio_tower.layers[0].self_attn.q_proj.weight),
             (ours.projector.linear1.weight, hf.model.multi_modal_projector.linear_1.weight),
             (ours.decoder.embed_tokens.weight, hf.model.language_model.embed_tokens.weight)]
    for mine, theirs in pairs:
        assert mine.grad is not None and mine.grad.abs().sum() > 0
        assert_close_scaled(mine.grad, theirs.grad, 1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_without_nans(dtype) -> None:
    hf = tiny_hf_model(seed=2)
    ref_model = hf_to_af3_model(hf)
    ours = hf_to_af3_model(hf).to(dtype)
    b = make_batch([[801], [201, 97]], seed=4)
    real = b["attention_mask"].bool()
    with torch.no_grad():
        ref = ref_model(**b)
        for backend in ("sdpa", "math") if dtype == torch.bfloat16 else ("sdpa",):
            ours.set_attention(backend)
            out = ours(**b)  # float32 features are cast to the model's dtype
            assert out.logits.dtype == dtype
            assert torch.isfinite(out.logits).all()
            assert_close_scaled(out.logits[real].float(), ref.logits[real], 5e-2)
            assert abs(out.loss.item() - ref.loss.item()) < 5e-2 * max(1.0, ref.loss.item())
            cache = ours.new_cache(2, b["input_ids"].shape[1])
            assert cache.dtype == dtype
            step = ours(b["input_ids"], b["attention_mask"], b["input_features"], b["input_features_mask"],
                        cache=cache)
            assert torch.isfinite(step.logits).all()


def test_audio_token_mismatch_names_both_counts(batch) -> None:
    ours = hf_to_af3_model(tiny_hf_model())
    n_frames = sum((L + 1) // 4 for w in WINDOWS for L in w)
    n_tokens = int((batch["input_ids"] == TINY_AUDIO_ID).sum())
    assert n_tokens == n_frames
    ids = batch["input_ids"].clone()
    ids[0, -1] = TINY_AUDIO_ID  # one <sound> too many
    with pytest.raises(ValueError, match=f"Audio tokens and features mismatch: {n_tokens + 1} <sound> "
                                         f"tokens but {n_frames} audio frames"):
        ours(ids, batch["attention_mask"], batch["input_features"], batch["input_features_mask"])
    with pytest.raises(ValueError, match=f"{n_tokens} <sound> tokens but {n_frames - 750} audio frames"):
        ours(batch["input_ids"], batch["attention_mask"], batch["input_features"][1:],
             batch["input_features_mask"][1:])
    with pytest.raises(ValueError, match=f"{n_tokens} <sound> tokens but 0 audio frames"):
        ours(batch["input_ids"], batch["attention_mask"])


def test_state_dict_names_are_the_contract() -> None:
    for tied in (False, True):
        model = hf_to_af3_model(tiny_hf_model(tie_word_embeddings=tied, num_hidden_layers=1,
                                              audio={"encoder_layers": 1}))
        enc = [f"encoder.{n}" for n in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                                        "embed_positions.weight", "norm.weight", "norm.bias")]
        enc += [f"encoder.layers.0.{m}.{p}" for m in ("attn_norm", "attn.q", "attn.v", "attn.o", "mlp_norm",
                                                       "fc1", "fc2") for p in ("weight", "bias")]
        enc += ["encoder.layers.0.attn.k.weight"]
        proj = [f"projector.linear{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]
        dec = ["decoder.embed_tokens.weight", "decoder.norm.weight"] + ([] if tied else ["decoder.lm_head.weight"])
        dec += [f"decoder.layers.0.attn.{m}.{p}" for m in "qkv" for p in ("weight", "bias")]
        dec += [f"decoder.layers.0.{m}.weight" for m in ("attn.o", "attn_norm", "mlp_norm", "mlp.gate",
                                                         "mlp.up", "mlp.down")]
        assert sorted(model.state_dict()) == sorted(enc + proj + dec)
        # In memory q, k and v are merged: the state dict's parts are their rows, in order, and
        # loading joins them back.
        layer, state = model.decoder.layers[0], model.state_dict()
        assert [k.removeprefix("decoder.layers.0.") for k in state if k.startswith("decoder.layers.0.")] == [
            "attn_norm.weight", "attn.q.weight", "attn.q.bias", "attn.k.weight", "attn.k.bias", "attn.v.weight",
            "attn.v.bias", "attn.o.weight", "mlp_norm.weight", "mlp.gate.weight", "mlp.up.weight", "mlp.down.weight"]
        assert torch.equal(layer.attn.qkv.weight, torch.cat([state[f"decoder.layers.0.attn.{m}.weight"] for m in "qkv"]))
        fresh = AudioFlamingo3(model.config)
        fresh.load_state_dict(state, strict=True)
        assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True))
        assert model.encoder.embed_positions.weight.shape == (1500, 16)
        model.new_cache(1, 8)
        assert not list(model.buffers())  # caches live outside the model; nothing to save or re-init


def test_builds_on_meta_device() -> None:
    config = hf_to_af3_model(tiny_hf_model()).config
    with torch.device("meta"):
        model = AudioFlamingo3(config)
    assert all(p.is_meta for p in model.parameters())


def test_generate_delegates(monkeypatch) -> None:
    import af3.generation
    import af3.model

    seen = {}
    monkeypatch.setattr(af3.model, "generate", lambda model, **kw: seen.update(model=model, **kw) or 7)
    model = hf_to_af3_model(tiny_hf_model())
    assert isinstance(model.generation_config, af3.generation.GenerationConfig)
    ids = torch.zeros(1, 3, dtype=torch.long)
    assert model.generate(input_ids=ids, max_new_tokens=2) == 7
    assert seen["model"] is model and seen["input_ids"] is ids and seen["max_new_tokens"] == 2


@pytest.mark.parametrize("windows_alone", [True, False], ids=["windows-alone", "masked-batch"])
def test_trainable_parameters_and_activations_kept_as_transformers(windows_alone, monkeypatch) -> None:
    """The position table is frozen as in transformers (and Whisper), everything else trains; a
    training step runs each layer forward once (the encoder's once per window when the CPU runs
    windows of different lengths alone) unless gradient checkpointing is asked for."""
    monkeypatch.setattr(af3.encoder, "_CPU_WINDOWS_ALONE", windows_alone)
    hf = tiny_hf_model(seed=5, audio={"encoder_layers": 1}, num_hidden_layers=1)
    ours = hf_to_af3_model(hf).train()
    assert ours.encoder.gradient_checkpointing is False and ours.decoder.gradient_checkpointing is False  # until asked
    assert not ours.encoder.embed_positions.weight.requires_grad
    assert not hf.model.audio_tower.embed_positions.weight.requires_grad
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, hf)]
    assert trainable[0] == trainable[1]

    calls: list[str] = []
    for name, layer in (("encoder", ours.encoder.layers[0]), ("decoder", ours.decoder.layers[0])):
        layer.register_forward_pre_hook(lambda *_, name=name: calls.append(name))
    b = make_batch([[1600], [3000, 500]], seed=7)  # short windows: run alone, or the key mask in play
    encoder_runs = 3 if windows_alone else 1
    # Only weights inside the layers train (as with adapters): no layer input requires grad, the
    # case where reentrant checkpointing would silently give those weights no gradient.
    ours.requires_grad_(False)
    trained = [ours.encoder.layers[0].attn.q.weight, ours.decoder.layers[0].attn.qkv.weight]
    for w in trained:
        w.requires_grad_(True)
    losses, grads = [], []
    for checkpointing in (False, True):
        calls.clear()
        ours.zero_grad()
        ours.encoder.gradient_checkpointing = ours.decoder.gradient_checkpointing = checkpointing
        loss = ours(**b).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([w.grad.flatten() for w in trained]))
        # Each layer runs once, or once more in the backward pass when checkpointing.
        assert sorted(calls) == sorted((["decoder"] + ["encoder"] * encoder_runs) * (1 + checkpointing))
    assert losses[0] == losses[1]
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6)


def test_decoder_checkpointing_trains_weights_inside_layers_when_no_input_needs_grad() -> None:
    """Text only, every weight frozen but one inside a decoder layer (as with LoRA): the decoder's
    input then requires no grad, where reentrant checkpointing would give that weight none."""
    ours = hf_to_af3_model(tiny_hf_model(seed=6, num_hidden_layers=2)).train()
    ours.requires_grad_(False)
    weight = ours.decoder.layers[1].mlp.up.weight.requires_grad_(True)
    ids = torch.tensor([[5, 6, 9, 30, 31, 7], [11, 12, 13, 14, 15, 16]])
    grads = []
    for checkpointing in (False, True):
        weight.grad = None
        ours.decoder.gradient_checkpointing = checkpointing
        ours(ids, labels=ids).loss.backward()
        assert weight.grad is not None, f"no gradient with checkpointing={checkpointing}"
        grads.append(weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6)


def test_norm_eps_comes_from_the_config() -> None:
    """Every norm takes its eps from the config (the defaults are the real model's, so a norm that
    fell back to torch's own default would go unseen)."""
    from dataclasses import replace

    from af3.qwen2 import RMSNorm

    config = af3_config_of(tiny_hf_model())
    config = replace(config, audio=replace(config.audio, layer_norm_eps=0.25),
                     text=replace(config.text, rms_norm_eps=0.125))
    model = AudioFlamingo3(config)
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {0.25}
    assert {m.eps for m in model.modules() if isinstance(m, RMSNorm)} == {0.125}


@pytest.mark.parametrize("shape", [(1, 640), (2, 1, 640), (3, 640), (4, 1, 640), (5, 640)])
@pytest.mark.parametrize("bias", [True, False])
def test_decode_linear_split_equals_f_linear(shape, bias, monkeypatch):
    # qwen2.linear: few rows of fp32 by a big weight run as one batched product per thread
    # (MKL's own kernel for them is one-threaded); the numbers are F.linear's to float precision.
    from af3 import qwen2

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1024, 640, generator=g)
    b = torch.randn(1024, generator=g) if bias else None
    x = torch.randn(*shape, generator=g)
    splits = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: splits.append(1) or real_bmm(*a))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            y = qwen2.linear(x, weight, b)
    finally:
        torch.set_num_threads(threads)
    assert y.shape == (*shape[:-1], 1024) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, weight, b), rtol=1e-5, atol=1e-4)
    assert len(splits) == (x.numel() // 640 <= qwen2.SPLIT_ROWS)  # 5 rows: MKL's own product


@pytest.mark.parametrize("case", ["one thread", "odd rows", "strided weight", "bf16", "mixed dtypes", "grad"])
def test_decode_linear_leaves_to_f_linear_what_the_split_cannot_take(case, monkeypatch):
    # The split needs 2+ threads, a contiguous fp32 weight whose rows divide among them, fp32
    # input and no autograd (training keeps F.linear's backward); anything else is F.linear's,
    # a mixed-dtype call included (which F.linear refuses).
    from af3 import qwen2

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1023 if case == "odd rows" else 1024, 640, generator=g)
    if case == "strided weight":
        weight = torch.randn(640, 1024, generator=g).t()
    x = torch.randn(2, 1, 640, generator=g)
    if case in ("bf16", "mixed dtypes"):
        weight = weight.bfloat16()
    if case == "bf16":
        x = x.bfloat16()
    splits = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: splits.append(1) or real_bmm(*a))
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if case == "one thread" else 2)
    try:
        with torch.inference_mode(case != "grad"), torch.set_grad_enabled(case == "grad"):
            if case == "mixed dtypes":
                with pytest.raises(RuntimeError):
                    qwen2.linear(x, weight)
            else:
                torch.testing.assert_close(qwen2.linear(x, weight), F.linear(x, weight))
    finally:
        torch.set_num_threads(threads)
    assert not splits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sum_chunk", [4096, 16], ids=["one-sum", "4-chunks"])
def test_decode_linear_compiled_form_equals_f_linear(dtype, bias, sum_chunk, monkeypatch):
    # Under torch.compile, qwen2.linear writes few-row products as a multiply and a sum (inductor
    # fuses them), longer ones summed in chunks; run that form eagerly here and compare with
    # F.linear in each dtype.
    from af3 import qwen2

    monkeypatch.setattr(qwen2, "SUM_CHUNK", sum_chunk)
    assert qwen2._chunks(64) == (1 if sum_chunk == 4096 else 4)
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(96, 64, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype) if bias else None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for shape in ((2, 1, 64), (3, 64)):  # a decode step's (B, 1, d), and rows without a time axis
        x = torch.randn(*shape, generator=g).to(dtype)
        y = qwen2.linear(x, weight, b)
        assert y.dtype == dtype and y.shape == (*shape[:-1], 96)
        expected = F.linear(x.float(), weight.float(), None if b is None else b.float())  # fp32 sums, as F.linear's
        torch.testing.assert_close(y, expected.to(dtype), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-4)


def test_compiled_sums_are_chunked_to_at_most_sum_chunk():
    from af3.qwen2 import SUM_CHUNK, _chunks

    assert SUM_CHUNK == 4096
    # the mid model's and AF3's MLP down products; short ones; a length no count up to 64 divides
    assert [_chunks(k) for k in (4864, 18944, 3584, 4096, 4099)] == [2, 8, 1, 1, 1]


def test_cpu_prefill_of_a_left_padded_batch_runs_each_row_alone(monkeypatch):
    # On the CPU a prefill from slot 0 runs each left-padded row's real tokens alone (plain causal
    # attention, no padding): the logits and the cache at every real position equal the masked
    # batch's, and with HF's (compared in the generation parity tests).
    import af3.model

    model = hf_to_af3_model(tiny_hf_model(seed=3))
    batch = make_batch([[3000, 1001], [397], [800]], seed=5)
    batch.pop("labels")
    t = batch["input_ids"].shape[1]
    real = batch["attention_mask"].bool()
    results, calls = {}, []
    decoder_forward = model.decoder.forward
    monkeypatch.setattr(model.decoder, "forward", lambda *a, **k: calls.append(a[0].shape) or decoder_forward(*a, **k))
    for alone in (True, False):
        monkeypatch.setattr(af3.model, "_CPU_ROWS_ALONE", alone)
        cache = model.new_cache(3, t + 5)
        with torch.no_grad():
            logits = model(**batch, cache=cache).logits
        slots = [torch.stack(c)[:, :, :, :t].permute(1, 3, 0, 2, 4) for c in (cache.k, cache.v)]  # (B, t, ...)
        results[alone] = logits[real], slots[0][real], slots[1][real]
    assert calls[:3] == [(1, int(n), 32) for n in real.sum(1)] and calls[3] == (3, t, 32)  # rows alone, then one batch
    for got, expected in zip(results[True], results[False]):
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_rows_alone_only_for_a_fresh_cpu_prefill_with_left_padding(monkeypatch):
    import af3.model
    from af3.model import _rows_alone

    x, cache = torch.zeros(2, 4, 8), object()
    assert not _rows_alone(x, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), cache, torch.arange(4))  # too short
    monkeypatch.setattr(af3.model, "ROWS_ALONE_MIN_TOKENS", 2)
    left, right, full = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), \
        torch.ones(2, 4)
    start = torch.arange(4)
    assert _rows_alone(x, left, cache, start)
    assert not _rows_alone(x, right, cache, start)  # right padding
    assert not _rows_alone(x, torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]), cache, start)  # a hole
    assert not _rows_alone(x, full, cache, start)  # no padding: one batch is as good
    assert not _rows_alone(x, left, None, start)  # no cache
    assert not _rows_alone(x, left, cache, start + 3)  # a later turn: earlier slots hold tokens
    assert not _rows_alone(x[:1], left[:1], cache, start)  # one row
    assert not _rows_alone(x[:, :1], left[:, :1], cache, start[:1])  # a decode step (one token)
    assert not _rows_alone(x, None, cache, start)
