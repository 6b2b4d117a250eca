"""Generation: sampling settings, HF-order logits processing and the KV-cached decoding loop.

The loop: encode the prompt (audio included) once, then feed one token per step through the
model's preallocated KV cache. Scores are processed in HF's order — repetition penalty over
the whole sequence so far, temperature, top-k, top-p — so greedy and seeded outputs match
transformers' `generate` on the same weights.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from af3.config import AF3Config, is_int, is_integer, is_real, write_json
from af3.jsonfile import parse_json
from af3.limits import check_fits, kv_cache_bytes
from af3.qwen2 import positions_from_mask

# generation_config.json keys of an HF checkpoint that mean the same thing here.
_HF_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens",
            "eos_token_id", "pad_token_id", "bos_token_id")


@dataclass
class GenerationConfig:
    """Decoding settings. Field names and defaults follow HF's `GenerationConfig`.

    `max_new_tokens` is 256 unless the checkpoint says otherwise (HF's fallback of a 20-token
    total `max_length` would cut every answer short).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        # numpy / torch scalars (np.int64(20), np.float32(0.7)) become plain Python numbers.
        for name in ("max_new_tokens", "top_k"):
            value = getattr(self, name)
            if is_integer(value):
                setattr(self, name, int(value))
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if is_real(value):
                setattr(self, name, float(value))
        self.eos_token_id = _as_id_list(self.eos_token_id, "eos_token_id")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _as_id(value, name))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError for settings `generate` cannot honour."""
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {type(self.do_sample).__name__}")
        _check_int(self.max_new_tokens, "max_new_tokens")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check_int(self.top_k, "top_k")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not is_real(value):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty}")
        if self.do_sample and self.temperature <= 0.0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature} "
                             "(use do_sample=False for greedy decoding)")

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with `changes` applied (unknown names are a ValueError), validated."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown generation argument(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, d: dict) -> GenerationConfig:
        """Pick the known keys of an HF `generation_config.json` dict; the rest are ignored."""
        if not isinstance(d, dict):
            raise TypeError(f"generation config must be a dict, got {type(d).__name__}")
        kwargs = {k: d[k] for k in _HF_KEYS if d.get(k) is not None}
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GenerationConfig:
        if not isinstance(d, dict):
            raise TypeError(f"generation config must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"generation config has unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> GenerationConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"generation config {path} does not exist")
        d = parse_json(path.read_bytes(), f"generation config {path}")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:  # a bad value: say which file holds it
            raise type(e)(f"generation config {path}: {e}") from None


def _check_int(value: Any, name: str) -> int:
    if not is_integer(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _as_id(value: Any, name: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    value = _check_int(value, name)
    if value < 0:
        raise ValueError(f"{name} must be a non-negative token id, got {value}")
    return value


def _as_id_list(value: Any, name: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if isinstance(value, (list, tuple)):
        return [_as_id(v, name) for v in value]
    return [_as_id(value, name)]



# ---------------------------------------------------------------------------------------------
# Logits processing, in HF's order: float scores (B, V) in and out (`seen_mask` makes the
# repetition penalty's mask of the ids seen so far).

def seen_mask(ids: torch.Tensor, vocab: int, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """Bool (B, vocab): which ids occur in `ids` (B, T), positions marked in `ignore` (B, T) left out
    (left padding, as HF's prompt_ignore_length). Ids at or beyond `vocab` are dropped."""
    ids = ids.clamp(max=vocab)  # out-of-vocabulary ids (and ignored positions) land in one extra column
    if ignore is not None:
        ids = ids.masked_fill(ignore, vocab)
    seen = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids, True)[:, :vocab]


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive (multiply negative) scores of every id marked in `seen` (B, V) by `penalty`."""
    if penalty == 1.0:
        return scores
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return scores if temperature == 1.0 else scores / temperature


def apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` highest scores (ties with the k-th are kept); 0 keeps all."""
    if top_k == 0:
        return scores
    k = min(top_k, scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]  # (B, 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of highest-probability ids whose mass exceeds `top_p` (nucleus)."""
    if top_p >= 1.0:
        return scores
    # Ascending order, as HF: drop the low tail whose cumulative mass is <= 1 - top_p.
    sorted_scores, order = torch.sort(scores, dim=-1)
    tail_mass = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = tail_mass <= 1.0 - top_p
    drop_sorted[..., -1] = False  # always keep the most likely id
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def process_scores(scores: torch.Tensor, seen: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Repetition penalty over `seen` (B, V, from `seen_mask`; always, as HF), then temperature,
    top-k, top-p (sampling only)."""
    scores = apply_repetition_penalty(scores, seen, config.repetition_penalty)
    if config.do_sample:
        scores = apply_temperature(scores, config.temperature)
        scores = apply_top_k(scores, config.top_k)
        scores = apply_top_p(scores, config.top_p)
    return scores


# ---------------------------------------------------------------------------------------------
# The decoding loop, gpt-fast style: `prefill` runs the prompt (audio included) once and checks
# it; `decode_one_token` runs one token per row with fixed shapes (it attends over a fixed span
# of cache slots, masked, and writes at `input_pos`), so it can be compiled and needs no host sync.

# How many tokens to generate between looks at "has every row finished?", by device type: each
# look waits for the device (on the CPU it costs nothing). Rows that finish in between get pad.
EOS_CHECK_EVERY = {"cpu": 1, "other": 8}


def prefill(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            features: dict, cache: Any, input_pos: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Float logits (B, V) of the last prompt token; the prompt's keys/values land in `cache`.
    The model checks its inputs here, once per generate call."""
    out = model(input_ids, attention_mask, **features, position_ids=position_ids, cache=cache,
                input_pos=input_pos, logits_to_keep=1)
    return out.logits[:, -1].float()


def decode_one_token(model: torch.nn.Module, token: torch.Tensor, filled: torch.Tensor, cache: Any,
                     input_pos: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Float logits (B, V) after one token per row: token (B, 1) at slot input_pos (1,), RoPE
    position position_ids (B, 1), attending over the slots `filled` (B x S, the same S every
    step; an attention mask over the cache) marks nonzero as holding real tokens, its own
    included."""
    return model.decode_step(token, filled, cache, input_pos, position_ids)[:, -1].float()


_compiled: dict[str, Any] = {}  # device type -> compiled decode_one_token
_compiled_models: weakref.WeakSet = weakref.WeakSet()
_kept_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled decoding's cache


def compiled_length(total: int, limit: int | None) -> int:
    """Slots a compiled decode attends over for `total` tokens: the next power of two from 256
    up (at most the model's context `limit`, never fewer than `total`). Each length is compiled
    once, so prompts of many lengths share a few compiled steps."""
    slots = max(256, 1 << (total - 1).bit_length())
    return max(total, min(slots, limit)) if limit is not None else slots


def _kept_cache(model: torch.nn.Module, batch: int, slots: int, param: torch.Tensor) -> Any:
    """The model's cache for compiled decoding, made again only when its shape, dtype or device
    changes: a CUDA graph is captured for the cache's addresses, and a new cache each call would
    capture it again each call (and after torch's limit of captures, run without the graph)."""
    cache = _kept_caches.get(model)
    if (cache is None or (cache.batch_size, cache.max_len, cache.dtype, cache.device)
            != (batch, slots, param.dtype, param.device)):
        _kept_caches.pop(model, None)  # free the old one before making the new one
        cache = model.new_cache(batch, slots, dtype=param.dtype, device=param.device)
        _kept_caches[model] = cache
    return cache


def compiled_decode_one_token(model: torch.nn.Module, device: torch.device) -> Any:
    """`decode_one_token` compiled with torch.compile: CUDA graphs on CUDA ("reduce-overhead"),
    inductor kernels elsewhere. Says so on stderr the first time a model goes through it."""
    if device.type not in _compiled:
        if device.type == "cuda":
            kw = {"mode": "reduce-overhead"}
        else:
            # Inductor writes a sum over at most 8 elements (linear's chunk partials) as adds
            # inlined where the sum is used: there, reading the partials with a stride, it
            # vectorized the mid model's LM head product across its outputs (transposing tiles
            # of the weight) and the bf16 step took 56 ms instead of 30. Kept as real sums,
            # every product reads its weight rows straight (tests/bench_mid.py).
            kw = {"options": {"unroll_reductions_threshold": 1}}
        _compiled[device.type] = torch.compile(decode_one_token, fullgraph=True, dynamic=False, **kw)
    if model not in _compiled_models:
        _compiled_models.add(model)
        print("af3: compiling the decode step (the first tokens take a while; later calls are fast)",
              file=sys.stderr, flush=True)
    return _compiled[device.type]


@torch.inference_mode()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             input_features: torch.Tensor | None = None, input_features_mask: torch.Tensor | None = None,
             *, generation_config: GenerationConfig | None = None, streamer: Any = None,
             seed: int | None = None, generator: torch.Generator | None = None,
             cache: Any = None, cached: int = 0, vocab_limit: int | None = None, compile: bool = False,
             **gen: Any) -> torch.Tensor:
    """Prompt + new tokens (B, P + n) for a left-padded batch, like HF's `generate`.

    Settings start from `generation_config` (default: `model.generation_config`) and are
    overridden by keyword arguments (`max_new_tokens`, `do_sample`, `temperature`, `top_k`,
    `top_p`, `repetition_penalty`, `eos_token_id`, `pad_token_id`). Rows stop independently
    at an eos token and are then filled with `pad_token_id`; a finished row is dropped from
    the work (unless compiled, or decoding into the caller's `cache`). `seed` or `generator` makes sampling reproducible (otherwise torch's global RNG
    is used, as HF does). `streamer` (e.g. `af3.streaming.TextStreamer`) gets `put(new_ids)`
    each step and `end()` at the end; it needs a batch of one. `cache` (from `model.new_cache`,
    with room for the whole result) is written in place; with `cached` = n it already holds
    the first n tokens of `input_ids` (a multi-turn chat reuses it, so the audio is encoded
    once). `vocab_limit`: ids at or above it are never generated (the unused rows of a padded
    embedding, which the tokenizer cannot decode). `compile=True` runs the decode step through
    torch.compile (`compiled_decode_one_token`); the tokens are the same. Compiled, the KV cache
    (rounded up to `compiled_length`) stays with the model for the next call of the same batch
    size, so a CUDA graph captured over it is replayed rather than captured again.
    """
    config = _resolve_config(model, generation_config, gen)
    input_ids, attention_mask = _check_inputs(input_ids, attention_mask)
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    if streamer is not None and batch != 1:
        raise ValueError(f"streaming needs a batch of one prompt, got {batch}")
    generator = _make_generator(seed, generator, device)
    pad_id = config.pad_token_id
    if pad_id is None:
        pad_id = config.eos_token_id[0] if config.eos_token_id else 0  # HF's fallback
    if vocab_limit is not None and (not is_int(vocab_limit) or vocab_limit < 1):
        raise ValueError(f"vocab_limit must be a positive int or None, got {vocab_limit!r}")
    vocab = _text_setting(model, "vocab_size")
    if vocab is not None:
        # A finished row is fed its pad id, so it must be a real row of the embedding.
        for name, ids in (("pad_token_id", [pad_id]), ("eos_token_id", config.eos_token_id)):
            bad = [i for i in ids if i >= vocab]
            if bad:
                raise ValueError(f"{name} {bad[0]} is outside the model's vocabulary of {vocab} ids")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")

    total = prompt_len + config.max_new_tokens
    limit = _text_setting(model, "max_position_embeddings")
    if limit is not None and total > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({config.max_new_tokens}) = {total} "
                         f"exceeds the model's context of {limit} tokens; lower max_new_tokens")
    _check_int(cached, "cached")
    if not 0 <= cached < prompt_len:
        raise ValueError(f"cached must be in [0, {prompt_len}) (the tokens of input_ids already in the cache; "
                         f"at least one must be new), got {cached}")
    own_cache = cache is None
    if own_cache and cached:
        raise ValueError("cached > 0 needs the cache that holds those tokens")
    # Compiled, the step attends over a length rounded up to a power of two, so that prompts of
    # other lengths reuse the compiled step (and its CUDA graph) instead of compiling another.
    slots = compiled_length(total, limit) if compile and own_cache else total
    if own_cache:
        param = next(model.parameters())
        if isinstance(getattr(model, "config", None), AF3Config):  # a crafted max_position_embeddings: not allocated
            check_fits(kv_cache_bytes(model.config.text, batch, slots, param.dtype), param.device,
                       f"the KV cache for {batch} x {slots:,} positions (prompt {prompt_len} + max_new_tokens "
                       f"{config.max_new_tokens:,})", "lower max_new_tokens")
        cache = _kept_cache(model, batch, slots, param) if compile else \
            model.new_cache(batch, slots, dtype=param.dtype, device=param.device)
    elif cache.max_len < total:
        raise ValueError(f"the cache has room for {cache.max_len} tokens but prompt + max_new_tokens = {total}; "
                         "grow it first (cache.grow) or lower max_new_tokens")
    elif compile:
        slots = min(compiled_length(total, limit), cache.max_len)

    # Preallocated outputs, and the decode steps' mask of the filled slots (the prompt's real
    # tokens; each step adds its own slot): they grow by writing, never by torch.cat.
    tokens = torch.full((batch, total), pad_id, dtype=torch.long, device=device)
    tokens[:, :prompt_len] = input_ids
    # Integers, as an attention mask: a compiled CPU step given a bool mask ran 6-10% slower.
    filled = torch.zeros((batch, slots), dtype=torch.long, device=device)
    filled[:, :prompt_len] = attention_mask != 0
    positions = positions_from_mask(attention_mask)  # (B, P): left padding does not shift them
    # The repetition penalty's memory, kept up to date one token at a time. Left padding takes
    # no part (HF's prompt_ignore_length).
    first_real = (attention_mask != 0).int().argmax(dim=1)  # (B,)
    ignore = torch.arange(prompt_len, device=device)[None, :] < first_real[:, None]  # (B, P)
    eos = torch.tensor(config.eos_token_id, dtype=torch.long, device=device)
    check_every = 1 if streamer is not None else EOS_CHECK_EVERY.get(device.type, EOS_CHECK_EVERY["other"])
    step_fn = compiled_decode_one_token(model, device) if compile else decode_one_token

    rows = torch.arange(batch, device=device)  # the rows still being decoded (all, at first)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    input_pos = torch.arange(cached, prompt_len, device=device)
    features = {"input_features": input_features, "input_features_mask": input_features_mask}
    features = {k: v for k, v in features.items() if v is not None}
    try:
        logits = prefill(model, input_ids[:, cached:], attention_mask, features, cache, input_pos,
                         positions[:, cached:])
        n_scores = logits.shape[-1]
        seen = seen_mask(input_ids, n_scores, ignore) if config.repetition_penalty != 1.0 else None
        banned = None  # ids the tokenizer cannot decode
        if vocab_limit is not None and vocab_limit < n_scores:
            banned = torch.arange(n_scores, device=device) >= vocab_limit  # (V,)
        position = positions[:, -1:]  # (B, 1)
        slot = input_pos[-1:]  # (1,)
        for step in range(config.max_new_tokens):
            if banned is not None:
                logits = logits.masked_fill(banned, float("-inf"))
            scores = process_scores(logits, seen, config)
            if config.do_sample:
                next_ids = torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)
            else:
                next_ids = scores.argmax(dim=-1)  # (b,)
            next_ids = torch.where(unfinished, next_ids, pad_id)
            tokens[rows, prompt_len + step] = next_ids
            if streamer is not None:
                streamer.put(next_ids)
            if eos.numel():
                unfinished = unfinished & ~torch.isin(next_ids, eos)
            if step + 1 == config.max_new_tokens:
                break
            if (step + 1) % check_every == 0 and eos.numel():
                n_left = int(unfinished.sum())  # the one wait for the device, every check_every tokens
                if n_left == 0:
                    break
                # Drop finished rows: no more work on them. Compiled, the batch keeps its shape
                # instead (each new batch size would be compiled, and captured, again).
                if own_cache and not compile and n_left < len(rows):
                    keep = unfinished.nonzero().squeeze(1)
                    cache.keep_rows(keep)
                    rows, unfinished, next_ids, position = rows[keep], unfinished[keep], next_ids[keep], position[keep]
                    filled = filled[keep]
                    seen = None if seen is None else seen[keep]
            if seen is not None:
                seen[torch.arange(len(rows), device=device), next_ids] = True
            slot, position = slot + 1, position + 1
            filled.index_fill_(1, slot, 1)
            logits = step_fn(model, next_ids[:, None], filled, cache, slot, position)
    finally:
        if streamer is not None:
            streamer.end()
    # Like HF, stop at the step where the last row finished.
    finished = (tokens[:, prompt_len:, None] == eos).any(-1) if eos.numel() else None
    if finished is not None and finished.any(1).all():
        end = prompt_len + int(finished.int().argmax(1).max()) + 1
        return tokens[:, :end]
    return tokens[:, :prompt_len + step + 1]


def _resolve_config(model: torch.nn.Module, config: GenerationConfig | None, gen: dict) -> GenerationConfig:
    if config is None:
        config = getattr(model, "generation_config", None) or GenerationConfig()
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"generation_config must be an af3 GenerationConfig, got {type(config).__name__}")
    return config.replace(**gen) if gen else config


def _check_inputs(input_ids: Any, attention_mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must have shape (batch, length) with both > 0, got {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16):
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    input_ids = input_ids.long()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                         f"input_ids shape {tuple(input_ids.shape)}")
    if not bool((attention_mask[:, -1] != 0).all()):
        rows = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} end in padding: generation needs left padding "
                         "(processor(..., padding_side='left'))")
    return input_ids, attention_mask


def _make_generator(seed: int | None, generator: torch.Generator | None,
                    device: torch.device) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(check_seed(seed))


def check_seed(seed: Any) -> int:
    """`seed` as an int that torch's generators take ([-2**63, 2**64)); TypeError or ValueError."""
    seed = _check_int(seed, "seed")
    if not -2**63 <= seed < 2**64:  # what torch.Generator.manual_seed accepts
        raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}")
    return seed


def _text_setting(model: torch.nn.Module, name: str) -> int | None:
    """`model.config.text.<name>` (vocab_size, max_position_embeddings), or None for a model without it."""
    return getattr(getattr(getattr(model, "config", None), "text", None), name, None)
