"""AudioFlamingo3 on bad input: clear errors naming the input, and no NaNs at the edges."""

from __future__ import annotations

import re

import pytest
import torch

from af3.config import AF3Config, AudioConfig, TextConfig
from af3.model import AudioFlamingo3
from af3.windows import pooled_length, window_token_count

AUDIO_ID = 63


def tiny_model(num_hidden_layers: int = 2, max_position_embeddings: int = 256) -> AudioFlamingo3:
    torch.manual_seed(0)
    config = AF3Config(
        audio=AudioConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        text=TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=num_hidden_layers,
                        num_attention_heads=4, num_key_value_heads=1,
                        max_position_embeddings=max_position_embeddings),
        audio_token_id=AUDIO_ID)
    return AudioFlamingo3(config).eval()


@pytest.fixture(scope="module")
def model() -> AudioFlamingo3:
    return tiny_model()


def ids(*shape: int) -> torch.Tensor:
    return torch.randint(0, AUDIO_ID, shape, generator=torch.Generator().manual_seed(1))


def features(n: int, valid: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    mask = (torch.arange(3000)[None] < torch.tensor(valid)[:, None]).long()
    return torch.randn(n, 128, 3000), mask


@pytest.mark.parametrize("bad, error, message", [
    ([[1, 2]], TypeError, "input_ids must be a torch.Tensor"),
    (torch.ones(1, 3), TypeError, "int64 or int32"),
    (torch.ones(3, dtype=torch.long), ValueError, r"shape \(batch, seq_len\)"),
    (torch.ones(2, 0, dtype=torch.long), ValueError, "seq_len >= 1"),
    (torch.tensor([[1, 64]]), ValueError, r"contains 64, outside the vocabulary \[0, 64\)"),
    (torch.tensor([[-1, 2]]), ValueError, "contains -1"),
])
def test_bad_input_ids(model, bad, error, message) -> None:
    with pytest.raises(error, match=message):
        model(bad)


def test_encoder_frame_counts_agree_with_the_token_counts() -> None:
    # Every mel length a window can have: the model keeps exactly as many frames as the
    # processor writes <sound> tokens.
    lengths = torch.arange(0, 3001)
    assert pooled_length(lengths).tolist() == [window_token_count(int(L)) for L in lengths]


def test_int32_ids_bool_mask_and_int32_labels_work(model) -> None:
    x = ids(2, 5)
    with torch.no_grad():
        ref = model(x, torch.ones(2, 5, dtype=torch.long), labels=x)
        out = model(x.int(), torch.ones(2, 5, dtype=torch.bool), labels=x.int())
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)


def test_bad_masks_positions_and_options(model) -> None:
    x = ids(2, 5)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(2, 5\), got \(2, 4\)"):
        model(x, torch.ones(2, 4))
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor"):
        model(x, [[1] * 5] * 2)
    with pytest.raises(ValueError, match=r"position_ids must have shape \(2, 5\)"):
        model(x, position_ids=torch.arange(4)[None])
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(x, logits_to_keep=-1)
    with pytest.raises(ValueError, match="logits_to_keep must be 0 to train"):
        model(x, labels=x, logits_to_keep=1)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 5\) like input_ids, got \(2, 4\)"):
        model(x, labels=x[:, :4])
    with pytest.raises(TypeError, match="labels must be int64 or int32"):
        model(x, labels=x.float())
    with pytest.raises(TypeError, match="position_ids must be a torch.Tensor"):
        model(x, position_ids=[[0, 1, 2, 3, 4]])
    with pytest.raises(ValueError, match="input_features_mask given without input_features"):
        model(x, input_features_mask=torch.ones(1, 3000))


def test_bad_audio_features(model) -> None:
    x = torch.full((1, 4), AUDIO_ID)
    feats, mask = features(1, [3000])
    with pytest.raises(ValueError, match=r"shape \(n_windows, 128, 3000\), got \(1, 128, 1500\)"):
        model(x, input_features=feats[..., :1500])
    with pytest.raises(TypeError, match="floating point"):
        model(x, input_features=feats.long())
    with pytest.raises(ValueError, match=r"input_features_mask must have shape \(1, 3000\)"):
        model(x, input_features=feats, input_features_mask=mask[:, :100])
    with pytest.raises(ValueError, match="input_features is on meta but the model is on cpu"):
        model(x, input_features=feats.to("meta"))
    with pytest.raises(TypeError, match="input_features must be a torch.Tensor"):
        model.get_audio_features(feats.numpy())


def test_short_and_empty_windows_give_finite_frames(model) -> None:
    # 0 valid frames: every key masked (the NaN trap); 2 frames round to 0 tokens, 3 to 1.
    # Both attention paths: torch's SDPA gives 0 for a row with no key, the plain math would give NaN.
    feats, mask = features(4, [0, 2, 3, 3000])
    for backend in ("math", "sdpa"):
        model.set_attention(backend)
        with torch.no_grad():
            audio = model.get_audio_features(feats, mask)
            hidden = model.encoder(feats, mask.sum(-1))
        assert audio.shape == (0 + 0 + 1 + 750, 16)
        assert torch.isfinite(audio).all() and torch.isfinite(hidden).all()


def test_cache_lifecycle_and_errors(model) -> None:
    with pytest.raises(ValueError, match="max_len must be positive, got 0"):
        model.new_cache(1, 0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        model.new_cache(1.0, 8)
    keys = set(model.state_dict())
    cache = model.new_cache(2, 6)
    assert len(cache.k) == 2 and cache.k[0].shape == (2, 1, 6, 4)  # layers x (B, kv_heads, max_len, head_dim)
    assert set(model.state_dict()) == keys  # the cache is not part of the model: never saved
    x = ids(2, 4)
    with torch.no_grad():
        model(x, cache=cache)
        with pytest.raises(ValueError, match=r"cache is full: the new tokens reach slot 6 but max_len is 6"):
            model(ids(2, 3), cache=cache, input_pos=torch.arange(4, 7))
        with pytest.raises(ValueError, match="cache was made for batch size 2 but the input has batch size 1"):
            model(ids(1, 1), cache=cache, input_pos=torch.tensor([4]))
        with pytest.raises(ValueError, match=r"attention_mask must have shape \(2, S\) with 4 < S <= 6"):
            model(ids(2, 1), torch.ones(2, 1), cache=cache, input_pos=torch.tensor([4]))
        with pytest.raises(ValueError, match=r"input_pos must be an int64 tensor of shape \(1,\)"):
            model(ids(2, 1), cache=cache, input_pos=torch.tensor([4, 5]))
        with pytest.raises(TypeError, match="input_pos must be a torch.Tensor, got int"):
            model(ids(2, 1), cache=cache, input_pos=4)
        with pytest.raises(ValueError, match="input_pos holds -1"):
            model(ids(2, 1), cache=cache, input_pos=torch.tensor([-1]))
        with pytest.raises(ValueError, match="input_pos names cache slots: it needs a cache"):
            model(ids(2, 1), input_pos=torch.tensor([4]))
        with pytest.raises(TypeError, match="KVCache"):
            model(x, cache={})
        again = model(x, cache=cache).logits  # slots 0..3 written again: the cache has no length to reset
        assert torch.allclose(again, model(x).logits, atol=1e-6)
        y = torch.cat([x, ids(2, 1)], dim=1)
        cache.grow(9)  # more room, the written slots kept
        nxt = model(y[:, 4:], cache=cache, input_pos=torch.tensor([4])).logits
        assert cache.max_len == 9 and torch.allclose(nxt, model(y).logits[:, 4:], atol=1e-5)


def test_cache_in_another_dtype_or_device(model) -> None:
    x = ids(1, 5)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(1, 5, dtype=torch.float64)
        model(x[:, :3], cache=cache)
        steps = [model(x[:, i:i + 1], cache=cache, input_pos=torch.tensor([i])).logits for i in (3, 4)]
    assert cache.dtype == torch.float64
    assert torch.allclose(torch.cat(steps, 1), full[:, 3:], atol=1e-5)
    with pytest.raises(ValueError, match="cache is on meta but input_ids is on cpu"):
        model(x, cache=model.new_cache(1, 5, device="meta"))


def test_positions_follow_the_mask(model) -> None:
    x = ids(1, 6)
    with torch.no_grad():
        plain = model(x).logits
        explicit = model(x, position_ids=torch.arange(6)[None]).logits
        shifted = model(x, position_ids=torch.arange(6)[None] + 3).logits
        gap = model(x, position_ids=torch.tensor([[0, 1, 2, 3, 4, 9]])).logits
        padded = model(torch.cat([ids(1, 2), x], 1), torch.tensor([[0, 0] + [1] * 6])).logits
    assert torch.allclose(plain, explicit, atol=1e-6)
    assert torch.allclose(plain, shifted, atol=1e-5)  # RoPE sees only relative positions
    assert torch.allclose(plain[:, :5], gap[:, :5], atol=1e-6)
    assert not torch.allclose(plain[:, 5], gap[:, 5], atol=1e-3)  # ... and it is in play
    with torch.no_grad():  # one row of positions serves every row of a batch
        batch = model(torch.cat([x, x]), position_ids=torch.arange(6)[None]).logits
    assert torch.allclose(batch, torch.cat([plain, plain]), atol=1e-6)
    assert torch.allclose(padded[:, 2:], plain, atol=1e-5)  # left padding does not shift positions
    assert torch.isfinite(padded).all()


def test_sound_tokens_after_prefill_are_text(model) -> None:
    # During cached decoding the model may emit the <sound> id; it is embedded like any token.
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(ids(1, 3), cache=cache)
        out = model(torch.tensor([[AUDIO_ID]]), cache=cache, input_pos=torch.tensor([3]))
    assert torch.isfinite(out.logits).all()


def test_whole_error_messages_and_the_edges_that_pass(model) -> None:
    """Each message in full (matched from start to end), and the inputs just inside each limit work."""
    x = ids(2, 5)
    a = torch.full((1, 4), AUDIO_ID)
    feats, fmask = features(1, [3000])
    cache = model.new_cache(2, 6)
    one = torch.tensor([4])
    n_s = "(with a cache it covers every slot attended to, the new tokens' included)"
    full = "make a larger one with model.new_cache(...) or cache.grow(...)"
    cases = [
        (lambda: model([[1, 2]]), TypeError, "input_ids must be a torch.Tensor, got list"),
        (lambda: model(torch.ones(1, 3)), TypeError, "input_ids must be int64 or int32, got torch.float32"),
        (lambda: model(torch.ones(3, dtype=torch.long)), ValueError,
         "input_ids must have shape (batch, seq_len) with seq_len >= 1, got (3,)"),
        (lambda: model(torch.ones(1, 2, dtype=torch.long, device="meta")), ValueError,
         "input_ids is on meta but the model is on cpu; move the inputs with .to(device)"),
        (lambda: model(torch.tensor([[0, 64]])), ValueError, "input_ids contains 64, outside the vocabulary [0, 64)"),
        (lambda: model(torch.tensor([[-1, 2]])), ValueError, "input_ids contains -1, outside the vocabulary [0, 64)"),
        (lambda: model(x, cache={}), TypeError, "cache must be a KVCache from model.new_cache, got dict"),
        (lambda: model(x, cache=model.new_cache(2, 6, device="meta")), ValueError,
         "cache is on meta but input_ids is on cpu"),
        (lambda: model(x[:1], cache=cache), ValueError, "cache was made for batch size 2 but the input has batch size 1"),
        (lambda: model(x, input_pos=torch.arange(5)), ValueError,
         "input_pos names cache slots: it needs a cache (model.new_cache)"),
        (lambda: model(x[:, :1], cache=cache, input_pos=4), TypeError, "input_pos must be a torch.Tensor, got int"),
        (lambda: model(x[:, :1], cache=cache, input_pos=torch.tensor([4, 5])), ValueError,
         "input_pos must be an int64 tensor of shape (1,) (one slot per new token), got torch.int64 (2,)"),
        (lambda: model(x[:, :1], cache=cache, input_pos=one.int()), ValueError,
         "input_pos must be an int64 tensor of shape (1,) (one slot per new token), got torch.int32 (1,)"),
        (lambda: model(x[:, :1], cache=cache, input_pos=one.to("meta")), ValueError,
         "input_pos is on meta but input_ids is on cpu"),
        (lambda: model(x[:, :1], cache=cache, input_pos=torch.tensor([-1])), ValueError,
         "input_pos holds -1; cache slots start at 0"),
        (lambda: model(x[:, :3], cache=cache, input_pos=torch.arange(4, 7)), ValueError,
         f"cache is full: the new tokens reach slot 6 but max_len is 6; {full}"),
        (lambda: model(torch.cat([x, x], 1), cache=cache), ValueError,
         f"cache is full: the new tokens reach slot 9 but max_len is 6; {full}"),
        (lambda: model(x, [[1] * 5] * 2), TypeError, "attention_mask must be a torch.Tensor, got list"),
        (lambda: model(x, torch.ones(2, 4)), ValueError, "attention_mask must have shape (2, 5), got (2, 4)"),
        *[(lambda m=m: model(x[:, :1], m, cache=cache, input_pos=one), ValueError,
           f"attention_mask must have shape (2, S) with 4 < S <= 6 {n_s}, got {tuple(m.shape)}")
          for m in (torch.ones(2, 4), torch.ones(2, 7), torch.ones(2, 6, 1), torch.ones(1, 6))],
        (lambda: model(x, torch.ones(2, 5, device="meta")), ValueError, "attention_mask is on meta but input_ids is on cpu"),
        (lambda: model(x, position_ids=[[0, 1, 2, 3, 4]]), TypeError, "position_ids must be a torch.Tensor, got list"),
        *[(lambda p=p: model(x, position_ids=p), ValueError, f"position_ids must have shape (2, 5), got {tuple(p.shape)}")
          for p in (torch.arange(4)[None], torch.arange(5)[None, None], torch.arange(5)[None].expand(3, 5))],
        (lambda: model(x, logits_to_keep=-1), ValueError, "logits_to_keep must be an int >= 0, got -1"),
        (lambda: model(x, logits_to_keep=1.0), ValueError, "logits_to_keep must be an int >= 0, got 1.0"),
        (lambda: model(x, labels=[[0]]), TypeError, "labels must be a torch.Tensor, got list"),
        (lambda: model(x, labels=x[:, :4]), ValueError, "labels must have shape (2, 5) like input_ids, got (2, 4)"),
        (lambda: model(x, labels=x, logits_to_keep=1), ValueError,
         "labels need every position's logits: logits_to_keep must be 0 to train"),
        (lambda: model(x, labels=x.float()), TypeError, "labels must be int64 or int32, got torch.float32"),
        (lambda: model(a, input_features=feats.repeat(2, 1, 1)), ValueError,
         "Audio tokens and features mismatch: 4 <sound> tokens but 1500 audio frames"),
        (lambda: model(a), ValueError,
         "Audio tokens and features mismatch: 4 <sound> tokens but 0 audio frames (no input_features given)"),
        (lambda: model(x, input_features_mask=fmask), ValueError, "input_features_mask given without input_features"),
        (lambda: model.get_audio_features(feats.numpy()), TypeError, "input_features must be a torch.Tensor, got ndarray"),
        *[(lambda f=f: model(a, input_features=f), ValueError,
           f"input_features must have shape (n_windows, 128, 3000), got {tuple(f.shape)}")
          for f in (feats[..., :1500], feats[0], feats[:, :64])],
        (lambda: model(a, input_features=feats.long()), TypeError, "input_features must be floating point, got torch.int64"),
        (lambda: model(a, input_features=feats.to("meta")), ValueError,
         "input_features is on meta but the model is on cpu; move the inputs with .to(device)"),
        (lambda: model(a, input_features=feats, input_features_mask=[[1]]), TypeError,
         "input_features_mask must be a torch.Tensor, got list"),
        (lambda: model(a, input_features=feats, input_features_mask=fmask[:, :100]), ValueError,
         "input_features_mask must have shape (1, 3000) to match input_features, got (1, 100)"),
        (lambda: model(a, input_features=feats, input_features_mask=fmask.to("meta")), ValueError,
         "input_features_mask is on meta but the model is on cpu"),
        (lambda: model.new_cache(1.0, 8), TypeError, "batch_size must be an int, got float"),
        (lambda: model.new_cache(1, True), TypeError, "max_len must be an int, got bool"),
        (lambda: model.new_cache(0, 8), ValueError, "batch_size must be positive, got 0"),
        (lambda: model.new_cache(1, 0), ValueError, "max_len must be positive, got 0"),
        (lambda: model.set_attention("flash"), ValueError, "attention backend must be 'sdpa' or 'math', got 'flash'"),
        (lambda: AudioFlamingo3({}), TypeError, "config must be an AF3Config, got dict"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            call()

    # Just inside each limit: the last vocabulary id, a one-slot cache, the last slot, S = last + 1 and
    # S = max_len; half-precision features with a bool mask (15 frames: 4 tokens), int32 labels.
    f15, m15 = features(1, [15])
    with torch.no_grad():
        assert model(torch.tensor([[0, 62]])).logits.shape == (1, 2, 64)
        assert model.new_cache(1, 1).max_len == 1
        model(x, cache=cache)
        for s in (5, 6):
            assert model(x[:, :1], torch.ones(2, s), cache=cache, input_pos=one).logits.shape == (2, 1, 64)
        assert model(x[:, :1], cache=cache, input_pos=torch.tensor([5])).logits.shape == (2, 1, 64)
        assert model(a, input_features=f15.half(), input_features_mask=m15.bool()).logits.shape == (1, 4, 64)
        assert torch.isfinite(model(x, labels=x.int(), logits_to_keep=0).loss)


def test_set_attention_picks_the_path(model, monkeypatch) -> None:
    """'math' keeps every layer off torch's fused kernel, 'sdpa' puts every layer on it; same outputs."""
    import torch.nn.functional as F

    fused = F.scaled_dot_product_attention
    calls: list[int] = []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    a = torch.cat([torch.full((1, 4), AUDIO_ID), torch.tensor([[5, 6, 7, 8]])], dim=1)  # more than FEW_ROWS
    f15, m15 = features(1, [15])
    out = {}
    with torch.no_grad():
        for backend in ("math", "sdpa"):
            calls.clear()
            model.set_attention(backend)
            out[backend] = model(a, input_features=f15, input_features_mask=m15).logits
            out[backend + " calls"] = len(calls)
    assert out["math calls"] == 0 and out["sdpa calls"] == 3  # 1 encoder layer + 2 decoder layers
    assert torch.allclose(out["math"], out["sdpa"], atol=1e-5)


def test_audio_feature_and_cache_size_errors(model) -> None:
    feats, mask = features(1, [3000])
    with pytest.raises(ValueError, match=re.escape("input_features_mask must have shape (1, 3000) to match "
                                                   "input_features, got (1, 100)")):
        model.get_audio_features(feats, mask[:, :100])
    # Far past any machine's memory: refused before allocating, with the size and what to change.
    size = re.escape("a KV cache of 1 x 1,000,000,000,000 positions (max_len) would take 64000.00 GB "
                     "(64,000,000,000,000 bytes), more than the ")
    with pytest.raises(ValueError, match=f"^{size}.* of memory on cpu; lower max_len$"):
        model.new_cache(1, 10**12)


def test_audio_without_a_mask_is_full_windows() -> None:
    # input_features_mask left out: every window counts as full (3000 frames -> 750 audio tokens),
    # the same as passing an all-ones mask.
    model = tiny_model(num_hidden_layers=1, max_position_embeddings=1024)  # room for 750 audio tokens
    x = torch.cat([ids(1, 3), torch.full((1, 750), AUDIO_ID), ids(1, 2)], 1)
    feats, mask = features(1, [3000])
    with torch.no_grad():
        without = model(x, input_features=feats).logits
        with_mask = model(x, input_features=feats, input_features_mask=mask).logits
    assert torch.equal(without, with_mask)
