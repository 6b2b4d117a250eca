"""The audio encoder: Whisper-large-v3's encoder, then AF3's average pool and final LayerNorm.

Per 30 s window: 3000 mel frames -> conv stem (stride 2) -> 1500 positions -> pre-LN transformer
blocks (keys past the window's valid length masked) -> avg-pool (k=2, s=2) -> 750 frames -> LayerNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from af3.attention import attention
from af3.config import AudioConfig
from af3.windows import conv_length


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm computed in fp32, cast back to x's dtype."""
    w = None if norm.weight is None else norm.weight.float()
    b = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, w, b, norm.eps).to(x.dtype)


class EncoderAttention(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d, bias=False)  # Whisper quirk: the key projection has no bias
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.use_sdpa = True

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        # Whisper scales q before the product (not the scores); the order matters in low precision.
        q = self.q(x) * self.head_dim**-0.5
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = self.v(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        y = attention(q, k, v, mask, scale=1.0, use_sdpa=self.use_sdpa)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, d)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        d = cfg.hidden_size
        self.attn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = EncoderAttention(cfg)
        self.mlp_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(layer_norm(x, self.attn_norm), mask)
        x = x + self.fc2(F.gelu(self.fc1(layer_norm(x, self.mlp_norm))))
        if x.dtype == torch.float16:
            # As Whisper does: keep fp16 activations finite (inf would poison every later layer).
            limit = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-limit, limit)
        return x


class AudioEncoder(nn.Module):
    """input_features (n, mel_bins, 3000) + valid mel lengths (n,) -> (n, <= 750, d_audio), padded."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        # Whisper's sinusoidal table, stored as a learned one; HF keeps it frozen, so do we.
        # (HF's config has scale_embedding, but its encoder never applies it; neither do we.)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.embed_positions.requires_grad_(False)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        # Training: recompute each layer's activations in the backward pass instead of keeping them.
        self.gradient_checkpointing = False

    def forward(self, input_features: torch.Tensor, mel_lengths: torch.Tensor) -> torch.Tensor:
        """Encode windows; `mel_lengths` (n,) are the valid mel frames of each window.

        Returns (n, T_out, d): frame j of window i is valid for j < windows.pooled_length(mel_lengths)[i];
        T_out covers the longest window (750 when one window is full), the rest is padding.
        """
        x = F.gelu(self.conv1(input_features))  # (n, d, 3000)
        x = F.gelu(self.conv2(x))  # (n, d, 1500)
        x = x.transpose(1, 2) + self.embed_positions.weight  # (n, 1500, d)

        # Valid positions attend only to valid keys, so positions past the longest window's valid
        # length cannot change any valid output: drop them (a 5 s clip needs 1/6 of the work).
        # Keep an even count so the pool's pairs stay aligned.
        valid = conv_length(mel_lengths)
        t = min(x.shape[1], max(2, 2 * ((int(valid.max()) + 1) // 2)))
        x = x[:, :t]  # (n, T, d)
        mask = None
        if bool((valid < t).any()):
            # Only keys are masked: padded positions still get (unused) outputs.
            keys = torch.arange(t, device=x.device) < valid[:, None]  # (n, T)
            keys = keys | ~keys.any(-1, keepdim=True)  # a window with no valid frame: unused, kept finite
            mask = keys[:, None, None, :]  # (n, 1, 1, T)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)

        x = F.avg_pool1d(x.transpose(1, 2), kernel_size=2, stride=2).transpose(1, 2)  # (n, T/2, d)
        return layer_norm(x, self.norm)
