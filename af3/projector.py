"""The projector: maps encoder frames (d_audio) into the decoder's embedding space (d_text)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from af3.config import AF3Config


class Projector(nn.Module):
    """Linear(d_audio -> d_text) -> GELU -> Linear(d_text -> d_text)."""

    def __init__(self, config: AF3Config):
        super().__init__()
        d_audio, d_text = config.audio.hidden_size, config.text.hidden_size
        self.linear1 = nn.Linear(d_audio, d_text, bias=config.projector_bias)
        self.linear2 = nn.Linear(d_text, d_text, bias=config.projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))
