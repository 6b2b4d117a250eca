"""Generation: sampling settings, HF-order logits processing and the KV-cached decoding loop.

The loop: encode the prompt (audio included) once, then feed one token per step through the
model's preallocated KV cache. Scores are processed in HF's order — repetition penalty over
the whole sequence so far, temperature, top-k, top-p — so greedy and seeded outputs match
transformers' `generate` on the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
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
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> GenerationConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"generation config {path} does not exist")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"generation config {path} is not valid JSON: {e}") from None
        return cls.from_dict(d)


def _check_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")


def _as_id(value: Any, name: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = int(value)
    _check_int(value, name)
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


StreamCallback = Callable[[str], Any]
