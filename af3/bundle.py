"""The af3 bundle: model + processor + tokenizer behind three calls (transcribe, chat, generate)."""

from __future__ import annotations

from typing import Any

import torch

from af3.config import AF3Config
from af3.generation import GenerationConfig


class AF3:
    """What `af3.load(path)` returns.

    Attributes are the parts, usable on their own exactly as with transformers:
    `model` (AudioFlamingo3), `processor`, `tokenizer`, `config`, `generation_config`.
    """

    def __init__(self, *, model: torch.nn.Module, processor: Any, tokenizer: Any, config: AF3Config,
                 generation_config: GenerationConfig | None = None) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = tokenizer
        self.config = config
        self.generation_config = generation_config if generation_config is not None else GenerationConfig()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __repr__(self) -> str:
        return f"AF3(device={self.device}, dtype={self.dtype})"
