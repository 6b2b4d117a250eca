"""Generation: logits processing vs transformers' processors, and the decoding loop on a tiny fake
model that implements af3's forward + new_cache contract (exact cache bookkeeping checked)."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from af3 import generation, qwen2
from af3.generation import GenerationConfig, generate, process_scores, seen_mask
from af3.streaming import TextStreamer
from tests.devices import needs_cuda

VOCAB = 40
EOS = 3
PAD = 0


# --------------------------------------------------------------------------------------------
# A tiny causal LM honouring af3's contract: forward(input_ids, attention_mask, input_features,
# input_features_mask, position_ids=, cache=, input_pos=, logits_to_keep=) -> .logits;
# decode_step(token, filled, cache, input_pos, position_ids) -> logits; new_cache(B, max_len).
# The cache is written at input_pos; the mask (B, S) covers slots [0, S).

class FakeCache:
    def __init__(self, batch: int, max_len: int, dim: int, dtype, device) -> None:
        self.h = torch.zeros(batch, max_len, dim, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.h.shape[1]

    def keep_rows(self, rows) -> None:
        self.h = self.h[rows]


class FakeLM(torch.nn.Module):
    """Logits at t = f(mask-weighted mean of the prefix's embeddings, the position of t)."""

    def __init__(self, dim: int = 16, max_pos: int = 64, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, dim, generator=g))
        self.pos = torch.nn.Parameter(torch.randn(max_pos, dim, generator=g))
        self.audio = torch.nn.Parameter(torch.randn(dim, dim, generator=g))
        self.head = torch.nn.Parameter(torch.randn(VOCAB, dim, generator=g) * 3)
        self.config = SimpleNamespace(text=SimpleNamespace(max_position_embeddings=max_pos))
        self.generation_config = GenerationConfig(eos_token_id=[EOS], pad_token_id=PAD)
        self.calls: list[dict] = []

    def new_cache(self, batch_size, max_len, dtype=None, device=None):
        return FakeCache(batch_size, max_len, self.embed.shape[1], dtype or self.embed.dtype,
                         device or self.embed.device)

    def forward(self, input_ids, attention_mask=None, input_features=None, input_features_mask=None,
                labels=None, position_ids=None, cache=None, input_pos=None, logits_to_keep=0, step=False):
        B, T = input_ids.shape
        if input_pos is None:
            input_pos = torch.arange(T)
        self.calls.append({"T": T, "features": input_features is not None, "slot": int(input_pos[0]),
                           "B": B, "S": None if attention_mask is None else attention_mask.shape[1],
                           "step": step})
        x = self.embed[input_ids]  # (B, T, d)
        if input_features is not None:  # audio shifts every prompt embedding: prefill-only matters
            x = x + input_features.mean() * (x @ self.audio)
        if cache is None:
            keys, S = x, T
        else:
            cache.h[:, input_pos] = x
            S = cache.max_len if attention_mask is None else attention_mask.shape[1]
            keys = cache.h[:, :S]
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long)
        assert attention_mask.shape == (B, S)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, input_pos]
        q_slot = input_pos if cache is not None else torch.arange(T)
        visible = (torch.arange(S)[None, :] <= q_slot[:, None])[None] & attention_mask.bool()[:, None, :]
        w = visible.to(x.dtype)  # (B, T, S)
        h = torch.tanh((w @ keys) / w.sum(-1, keepdim=True).clamp(min=1) + self.pos[position_ids])
        logits = h @ self.head.T  # (B, T, V)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, loss=None)

    def decode_step(self, token, filled, cache, input_pos, position_ids):  # as AudioFlamingo3's: unchecked
        assert filled.dtype == torch.long and filled[:, input_pos].all()  # its own slot is filled
        return self.forward(token, filled, position_ids=position_ids, cache=cache, input_pos=input_pos,
                            step=True).logits


def naive_greedy(model: FakeLM, ids: list[int], n: int, penalty: float = 1.0, features=None) -> list[int]:
    """Reference: every step recomputes the whole sequence in two chunks (prompt with audio, the rest)."""
    out = list(ids)
    for _ in range(n):
        x = torch.tensor([out])
        cache = model.new_cache(1, len(out))
        logits = model(x[:, :len(ids)], input_features=features, cache=cache).logits
        if len(out) > len(ids):
            logits = model(x[:, len(ids):], attention_mask=torch.ones_like(x), cache=cache,
                           input_pos=torch.arange(len(ids), len(out))).logits
        seen = seen_mask(x, VOCAB)
        scores = process_scores(logits[:, -1].float(), seen, GenerationConfig(repetition_penalty=penalty))
        out.append(int(scores.argmax(-1)))
        if out[-1] == EOS:
            break
    return out


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# --------------------------------------------------------------------------------------------
# Logits processors against transformers'.

def hf_processors(cfg: GenerationConfig, pad_lengths: torch.Tensor | None):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    procs = LogitsProcessorList()
    if cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty, prompt_ignore_length=pad_lengths))
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k != 0:
            procs.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            procs.append(TopPLogitsWarper(cfg.top_p))
    return procs


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), do_sample=st.booleans(),
       penalty=st.sampled_from([1.0, 1.05, 1.3, 0.8]), temperature=st.sampled_from([1.0, 0.7, 1.6, 2.0]),
       top_k=st.sampled_from([0, 1, 5, 20, 100]), top_p=st.sampled_from([1.0, 0.8, 0.3, 0.01]))
def test_processing_matches_transformers(seed, do_sample, penalty, temperature, top_k, top_p):
    g = torch.Generator().manual_seed(seed)
    batch, seq, vocab = 3, 9, 50
    scores = torch.randn(batch, vocab, generator=g) * 4
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    pad_lengths = torch.tensor([0, 2, 5])
    ignore = torch.arange(seq)[None, :] < pad_lengths[:, None]
    cfg = GenerationConfig(do_sample=do_sample, repetition_penalty=penalty, temperature=temperature,
                           top_k=top_k, top_p=top_p)
    ours = process_scores(scores.clone(), seen_mask(ids, vocab, ignore), cfg)
    theirs = hf_processors(cfg, pad_lengths)(ids, scores.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=0, atol=0)


def test_penalty_covers_prompt_and_skips_left_padding():
    scores = torch.tensor([[2.0, -2.0, 2.0, 2.0]])
    ids = torch.tensor([[2, 0, 1]])
    ignore = torch.tensor([[True, False, False]])  # id 2 sits in the padding
    out = process_scores(scores, seen_mask(ids, 4, ignore), GenerationConfig(repetition_penalty=2.0))
    assert out.tolist() == [[1.0, -4.0, 2.0, 2.0]]


# --------------------------------------------------------------------------------------------
# The loop.

def test_greedy_matches_uncached_reference_and_encodes_audio_once():
    model = FakeLM()
    prompt = [5, 9, 11, 2, 7]
    feats = torch.full((1, 4, 6), 0.5)
    for penalty in (1.0, 1.3):
        model.calls.clear()
        out = generate(model, torch.tensor([prompt]), input_features=feats,
                       input_features_mask=torch.ones(1, 6, dtype=torch.bool), max_new_tokens=12,
                       repetition_penalty=penalty)
        assert out[0].tolist() == naive_greedy(model, prompt, 12, penalty, feats)[:out.shape[1]]
    model.calls.clear()
    out = generate(model, torch.tensor([prompt]), input_features=feats, max_new_tokens=6, eos_token_id=[])
    calls = model.calls
    assert calls[0] == {"T": 5, "features": True, "slot": 0, "B": 1, "S": 5, "step": False}  # checked once
    # Every decoding step: one token, no audio, no checks, and the same mask span (a static shape).
    assert all(c == {"T": 1, "features": False, "slot": c["slot"], "B": 1, "S": 11, "step": True}
               for c in calls[1:])
    assert [c["slot"] for c in calls] == [0, 5, 6, 7, 8, 9]
    assert out.shape == (1, 11) and out[0, :5].tolist() == prompt


def test_batch_left_padded_rows_equal_runs_alone_and_stop_independently():
    model = FakeLM(seed=3)
    rows = [[5, 9, 11, 2, 7, 8, 1], [4, 6], [12, 13, 14], [30]]
    ids, mask = left_pad(rows)
    n = 15
    # eos = row 1's first new token, so row 1 stops at once while others run on.
    eos = int(generate(model, torch.tensor([rows[1]]), max_new_tokens=1)[0, -1])
    kw = {"max_new_tokens": n, "repetition_penalty": 1.1, "eos_token_id": [eos], "pad_token_id": PAD}
    batched = generate(model, ids, mask, **kw)
    width = ids.shape[1]
    saw_early_stop = False
    for i, row in enumerate(rows):
        alone = generate(model, torch.tensor([row]), **kw)[0].tolist()
        new_alone = alone[len(row):]
        new_batched = batched[i, width:].tolist()
        assert new_batched[:len(new_alone)] == new_alone
        # After its eos a row holds only padding.
        assert all(t == PAD for t in new_batched[len(new_alone):])
        saw_early_stop |= len(new_alone) < batched.shape[1] - width
    assert saw_early_stop, "choose rows so that at least one stops before the others"
    # The whole batch stops once every row has stopped, or at max_new_tokens.
    assert batched.shape[1] <= width + n


@pytest.mark.parametrize("check_every", [1, 3])
def test_finished_rows_are_dropped_and_eos_is_looked_at_every_k_tokens(monkeypatch, check_every):
    # As on an accelerator, "has every row finished?" is asked every k tokens only (k=3 here); the
    # result is the same, rows that finished are dropped from the work at each look.
    monkeypatch.setitem(generation.EOS_CHECK_EVERY, "cpu", check_every)
    model = FakeLM(seed=3)
    rows = [[5, 9, 11, 2, 7, 8, 1], [4, 6], [12, 13, 14], [30]]
    ids, mask = left_pad(rows)
    eos = int(generate(model, torch.tensor([rows[1]]), max_new_tokens=1)[0, -1])
    kw = {"max_new_tokens": 15, "repetition_penalty": 1.1, "eos_token_id": [eos], "pad_token_id": PAD}
    monkeypatch.setitem(generation.EOS_CHECK_EVERY, "cpu", 1)
    reference = generate(model, ids, mask, **kw)
    monkeypatch.setitem(generation.EOS_CHECK_EVERY, "cpu", check_every)
    model.calls.clear()
    out = generate(model, ids, mask, **kw)
    assert torch.equal(out, reference)
    batch_sizes = [c["B"] for c in model.calls]
    assert batch_sizes[0] == 4 and min(batch_sizes) < 4  # row 1 stops at its first token
    assert batch_sizes == sorted(batch_sizes, reverse=True)
    # Row 1 is dropped at the first look after its eos (its first token), not later.
    assert batch_sizes.index(3) == check_every


def test_stops_when_all_rows_hit_eos_and_returns_prompt_plus_new():
    model = FakeLM()
    prompt = torch.tensor([[5, 9, 11]])
    logits = model(prompt).logits[0, -1]
    first = int(logits.argmax())
    out = generate(model, prompt, max_new_tokens=10, eos_token_id=first)
    assert out.tolist() == [[5, 9, 11, first]]
    out = generate(model, prompt, max_new_tokens=1, eos_token_id=[])
    assert out.shape == (1, 4)


def test_seed_reproduces_and_generator_equals_seed():
    model = FakeLM()
    prompt = torch.tensor([[5, 9, 11, 2]])
    kw = {"do_sample": True, "temperature": 1.5, "top_k": 0, "max_new_tokens": 20, "eos_token_id": []}
    a = generate(model, prompt, seed=7, **kw)
    b = generate(model, prompt, seed=7, **kw)
    c = generate(model, prompt, generator=torch.Generator().manual_seed(7), **kw)
    d = generate(model, prompt, seed=8, **kw)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d)
    torch.manual_seed(3)
    e = generate(model, prompt, **kw)
    torch.manual_seed(3)
    assert torch.equal(e, generate(model, prompt, **kw))


def test_top_k_one_sampling_equals_greedy():
    model = FakeLM()
    prompt = torch.tensor([[5, 9, 11, 2]])
    greedy = generate(model, prompt, max_new_tokens=10)
    sampled = generate(model, prompt, max_new_tokens=10, do_sample=True, top_k=1, temperature=0.3, seed=1)
    assert torch.equal(greedy, sampled)


def test_defaults_come_from_model_generation_config():
    model = FakeLM()
    model.generation_config = GenerationConfig(max_new_tokens=3, eos_token_id=[], pad_token_id=PAD)
    assert generate(model, torch.tensor([[5, 9]])).shape == (1, 5)
    assert generate(model, torch.tensor([[5, 9]]), max_new_tokens=4).shape == (1, 6)
    explicit = GenerationConfig(max_new_tokens=2, eos_token_id=[])
    assert generate(model, torch.tensor([[5, 9]]), generation_config=explicit).shape == (1, 4)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1, got 0"),
    ({"max_new_tokens": 2.0}, TypeError, "max_new_tokens must be an int, got float 2.0"),
    ({"do_sample": True, "temperature": 0.0}, ValueError, "temperature must be > 0 when sampling, got 0.0"),
    ({"do_sample": True, "temperature": -1.0}, ValueError, "temperature must be > 0 when sampling, got -1.0"),
    ({"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_k": -1}, ValueError, r"top_k must be >= 0 \(0 disables it\), got -1"),
    ({"repetition_penalty": 0.0}, ValueError, "repetition_penalty must be > 0"),
    ({"eos_token_id": -3}, ValueError, "eos_token_id must be a non-negative token id, got -3"),
    ({"num_beams": 4}, ValueError, r"unknown generation argument\(s\) \['num_beams'\]"),
    ({"seed": 1, "generator": torch.Generator()}, ValueError, "pass either seed or generator, not both"),
    ({"generator": 3}, TypeError, "generator must be a torch.Generator, got int"),
    # beyond the fake model's 64-token context
    ({"max_new_tokens": 100}, ValueError, r"prompt \(2 tokens\) \+ max_new_tokens \(100\) = 102 exceeds"),
    # was multinomial's RuntimeError
    ({"do_sample": True, "temperature": float("nan")}, ValueError, "temperature must be a finite number, got nan"),
    ({"repetition_penalty": float("nan")}, ValueError, "repetition_penalty must be a finite number, got nan"),
    ({"temperature": float("inf")}, ValueError, "temperature must be a finite number, got inf"),
    # was torch's "Overflow when unpacking long long"
    ({"do_sample": True, "seed": 2**70}, ValueError, r"seed must be in \[-2\*\*63, 2\*\*64\)"),
    ({"seed": 1.5}, TypeError, "seed must be an int, got float 1.5"),
    ({"vocab_limit": 0}, ValueError, "vocab_limit must be a positive int or None, got 0"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        generate(FakeLM(), torch.tensor([[5, 9]]), **kwargs)


def test_numpy_scalar_settings_are_plain_numbers():
    cfg = GenerationConfig(max_new_tokens=np.int64(3), top_k=np.int32(5), temperature=np.float32(0.5),
                           eos_token_id=np.int64(2), pad_token_id=torch.tensor(1))
    assert (cfg.max_new_tokens, cfg.top_k, cfg.temperature, cfg.eos_token_id, cfg.pad_token_id) == (3, 5, 0.5, [2], 1)
    assert type(cfg.max_new_tokens) is int and type(cfg.temperature) is float
    with pytest.raises(TypeError, match="pad_token_id must be an int"):
        GenerationConfig(pad_token_id=torch.tensor(1.0))


def test_pad_and_eos_ids_must_be_in_the_model_vocabulary(hf_and_af3):
    _, ours = hf_and_af3
    ids = torch.tensor([[5, 6, 9]])
    vocab = ours.config.text.vocab_size
    with pytest.raises(ValueError, match=f"pad_token_id {vocab} is outside the model's vocabulary of {vocab} ids"):
        generate(ours, ids, max_new_tokens=2, pad_token_id=vocab)
    with pytest.raises(ValueError, match=f"eos_token_id {vocab + 5} is outside"):
        generate(ours, ids, max_new_tokens=2, pad_token_id=PAD, eos_token_id=[1, vocab + 5])


def test_bad_inputs():
    model = FakeLM()
    with pytest.raises(TypeError, match="input_ids"):
        generate(model, [[1, 2]])
    with pytest.raises(ValueError, match="shape"):
        generate(model, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="dtype"):
        generate(model, torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="does not match"):
        generate(model, torch.tensor([[1, 2]]), torch.ones(1, 3))
    with pytest.raises(ValueError, match="left padding"):
        generate(model, torch.tensor([[1, 2]]), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="batch of one"):
        generate(model, torch.tensor([[1, 2], [3, 4]]), streamer=TextStreamer(ByteTokenizer()))
    # Sampling settings are checked even when greedy would ignore them (as the config is).
    with pytest.raises(ValueError, match="top_p"):
        generate(model, torch.tensor([[1, 2]]), do_sample=False, top_p=2.0)


def test_generation_config_hf_and_json(tmp_path):
    hf = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
          "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
          "transformers_version": "4.57.0"}
    cfg = GenerationConfig.from_hf(hf)
    assert (cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty) == (True, 0.7, 20, 0.8, 1.05)
    assert cfg.eos_token_id == [151645, 151643] and cfg.pad_token_id == 151643
    assert GenerationConfig.from_hf({"eos_token_id": 7}).eos_token_id == [7]
    cfg.save(tmp_path / "g.json")
    assert GenerationConfig.load(tmp_path / "g.json") == cfg
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        GenerationConfig.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        GenerationConfig.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown key"):
        GenerationConfig.from_dict({**dataclasses.asdict(cfg), "num_beams": 2})
    with pytest.raises(TypeError, match="generation config must be a dict, got list"):
        GenerationConfig.from_hf([1])


# --------------------------------------------------------------------------------------------
# Streaming.

class ByteTokenizer:
    """Ids 0..255 are bytes (as byte-level BPE ends up), 256+ are special tokens."""

    def decode(self, ids, skip_special_tokens=False):
        data = bytes(i for i in ids if i < 256)
        text = data.decode("utf-8", errors="replace")
        if not skip_special_tokens:
            text += "".join(f"<{i}>" for i in ids if i >= 256)
        return text


@pytest.mark.parametrize("text", ["héllo wörld", "中文字符 and 😀 emoji", "plain ascii", "é"])
def test_streamer_never_splits_a_character(text):
    pieces: list[str] = []
    streamer = TextStreamer(ByteTokenizer(), pieces.append)
    for b in text.encode():
        streamer.put(torch.tensor([b]))
    streamer.put(torch.tensor([300]))  # eos: skipped
    streamer.end()
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_streamer_flushes_invalid_tail_at_end():
    pieces: list[str] = []
    streamer = TextStreamer(ByteTokenizer(), pieces.append)
    streamer.put([ord("a"), 0xE4])  # 'a' then the first byte of a 3-byte character, never completed
    assert pieces == ["a"]
    streamer.end()
    assert "".join(pieces) == "a\ufffd"


def test_generate_streams_exactly_the_new_tokens():
    model = FakeLM()
    received: list[int] = []

    class Recorder:
        ended = False

        def put(self, ids):
            received.extend(ids.tolist())

        def end(self):
            Recorder.ended = True

    out = generate(model, torch.tensor([[5, 9, 11]]), max_new_tokens=8, streamer=Recorder())
    assert received == out[0, 3:].tolist() and Recorder.ended


# --------------------------------------------------------------------------------------------
# Against transformers' generate on the same tiny weights (audio included).

@pytest.fixture(scope="module")
def hf_and_af3():
    from tests.model_helpers import hf_to_af3_model, tiny_hf_model

    hf = tiny_hf_model(seed=1)
    return hf, hf_to_af3_model(hf)


def eos_that_stops_rows_apart(new: torch.Tensor) -> int:
    """A token id that one row produces well before another row does (or never does)."""
    n = new.shape[1]
    for token in new.flatten().tolist():
        first = [(row == token).nonzero()[0, 0].item() if (row == token).any() else n for row in new]
        if token != PAD and min(first) < n - 2 and max(first) > min(first) + 1:
            return token
    raise AssertionError(f"no token separates the rows in {new.tolist()}")


def audio_batch(valid_frames: list[int], texts: list[list[int]], seed: int = 0):
    """Left-padded prompts `text + <sound> * n + [7, 8]` with one window of audio each."""
    from tests.model_helpers import TINY_AUDIO_ID

    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(valid_frames), 128, 3000, generator=g)
    fmask = torch.zeros(len(valid_frames), 3000, dtype=torch.long)
    rows = []
    for i, (frames, text) in enumerate(zip(valid_frames, texts)):
        fmask[i, :frames] = 1
        rows.append(text + [TINY_AUDIO_ID] * ((frames + 1) // 4) + [7, 8])
    ids, mask = left_pad(rows)
    return ids, mask, feats, fmask


def test_greedy_equals_transformers_single_and_batched(hf_and_af3):
    penalty = 1.3  # the penalty path covers the plain one too (and HF's left-padding exclusion)
    hf, ours = hf_and_af3
    ids, mask, feats, fmask = audio_batch([400, 160, 1000], [[5, 6, 9], [11], [12, 13, 14, 15, 16]])
    n = 12
    base = {"max_new_tokens": n, "do_sample": False, "repetition_penalty": penalty, "pad_token_id": PAD}
    hf_free = hf.generate(input_ids=ids, attention_mask=mask, input_features=feats, input_features_mask=fmask,
                          eos_token_id=None, **base)
    eos = eos_that_stops_rows_apart(hf_free[:, ids.shape[1]:])
    kw = dict(base, eos_token_id=[eos])
    theirs = hf.generate(input_ids=ids, attention_mask=mask, input_features=feats, input_features_mask=fmask, **kw)
    mine = generate(ours, ids, mask, feats, fmask, **kw)
    assert torch.equal(mine, theirs)
    stops = [(row == eos).nonzero()[0, 0].item() if (row == eos).any() else None for row in mine[:, ids.shape[1]:]]
    early = [i for i, s in enumerate(stops) if s is not None and s + 1 < mine.shape[1] - ids.shape[1]]
    assert early, "some row must stop before the batch does"
    for i in early:
        assert (mine[i, ids.shape[1] + stops[i] + 1:] == PAD).all()
    # Each row alone (no padding) gives the same tokens as in the batch.
    for i in range(3):
        real = mask[i].bool()
        alone = generate(ours, ids[i:i + 1, real], None, feats[i:i + 1], fmask[i:i + 1], **kw)
        new = alone[0, int(real.sum()):]
        assert torch.equal(mine[i, ids.shape[1]:ids.shape[1] + len(new)], new)


def check_compiled_decoding(hf, ours, device: str = "cpu") -> None:
    """compile=True gives the greedy tokens of eager decoding and of transformers; a prompt of
    another length reuses the compiled step (no recompilation); another batch size replaces the
    cache kept for compiled decoding."""
    ids, mask, feats, fmask = (t.to(device) for t in audio_batch([400, 160], [[5, 6, 9], [11]]))
    kw = {"max_new_tokens": 10, "do_sample": False, "repetition_penalty": 1.3, "pad_token_id": PAD}
    theirs = hf.generate(input_ids=ids, attention_mask=mask, input_features=feats, input_features_mask=fmask,
                         eos_token_id=None, **kw)
    kw["eos_token_id"] = []
    eager = generate(ours, ids, mask, feats, fmask, **kw)
    assert torch.equal(eager, theirs)
    assert torch.equal(generate(ours, ids, mask, feats, fmask, compile=True, **kw), eager)
    assert torch.equal(generate(ours, ids, mask, feats, fmask, compile=True, **kw), eager)  # compiled once
    # Another prompt length (here, one more token of text) reuses the compiled step.
    ids2, mask2, _, _ = (t.to(device) for t in audio_batch([400, 160], [[5, 6, 9, 4], [11]]))
    with torch._dynamo.config.patch(error_on_recompile=True):
        longer = generate(ours, ids2, mask2, feats, fmask, compile=True, **kw)
    assert torch.equal(longer, generate(ours, ids2, mask2, feats, fmask, **kw))
    # Another batch size: a new cache (and step) replaces the kept one.
    one = generate(ours, ids[1:], mask[1:], feats[1:], fmask[1:], compile=True, **kw)
    assert torch.equal(one, generate(ours, ids[1:], mask[1:], feats[1:], fmask[1:], **kw))
    assert generation._kept_caches[ours].batch_size == 1


@needs_cuda
def test_compiled_decode_on_cuda_runs_as_a_cuda_graph_with_the_same_tokens(hf_and_af3):
    # On CUDA compile=True captures the decode step as a CUDA graph. The graph may write only
    # tensors at fixed addresses: the cache's are marked so (unmarked, torch skips the graph and
    # counts a skip). fp32 greedy tokens equal eager CUDA and transformers on CUDA.
    from torch._dynamo.utils import counters

    counters.clear()
    check_compiled_decoding(*(copy.deepcopy(m).cuda() for m in hf_and_af3), device="cuda")
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


def test_compiled_length_is_a_power_of_two_within_the_context():
    from af3.generation import compiled_length

    assert [compiled_length(n, 32768) for n in (1, 256, 257, 1000, 1025, 32768)] == [256, 256, 512, 1024, 2048, 32768]
    assert compiled_length(300, 400) == 400  # capped by the model's context
    assert compiled_length(300, 200) == 300  # never fewer slots than tokens
    assert compiled_length(5000, None) == 8192


def test_seeded_sampling_equals_transformers(hf_and_af3):
    hf, ours = hf_and_af3
    ids, mask, feats, fmask = audio_batch([400, 800], [[5, 6, 9], [11]], seed=2)
    kw = {"max_new_tokens": 10, "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
          "repetition_penalty": 1.05, "pad_token_id": PAD, "eos_token_id": None}
    torch.manual_seed(123)
    theirs = hf.generate(input_ids=ids, attention_mask=mask, input_features=feats, input_features_mask=fmask, **kw)
    torch.manual_seed(123)
    mine = generate(ours, ids, mask, feats, fmask, **kw)
    assert torch.equal(mine, theirs)


def test_model_generate_method_and_text_only(hf_and_af3):
    hf, ours = hf_and_af3
    ids = torch.tensor([[5, 6, 9, 30, 31]])
    theirs = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=PAD, eos_token_id=None)
    assert torch.equal(ours.generate(input_ids=ids, max_new_tokens=8, eos_token_id=[]), theirs)


@pytest.mark.parametrize("threads, sum_chunk", [(1, 4096), (2, 16)])
def test_compiled_decode_gives_the_same_tokens(hf_and_af3, capsys, monkeypatch, threads, sum_chunk):
    # torch.compile of the decode step (inductor on the CPU, CUDA graphs on CUDA): same tokens as
    # eager and as transformers. The compiled step takes qwen2.linear's multiply-and-sum form,
    # here in one sum or (sum_chunk 16) in chunks; eager, the products go through F.linear on
    # 1 thread and through the split product on 2.
    hf, ours = hf_and_af3
    monkeypatch.setattr(qwen2, "SUM_CHUNK", sum_chunk)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        capsys.readouterr()
        generation._compiled_models.discard(ours)  # as if this model had never been compiled
        check_compiled_decoding(hf, ours)
    finally:
        torch.set_num_threads(before)
    assert capsys.readouterr().err.count("compiling the decode step") == 1  # said on the first call only
    with pytest.raises(TypeError, match="compile must be True or False"):
        generate(ours, torch.tensor([[5, 6, 9]]), compile="yes")
