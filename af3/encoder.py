"""The audio encoder: Whisper-large-v3's encoder, then AF3's average pool and final LayerNorm.

Per 30 s window: 3000 mel frames -> conv stem (stride 2) -> 1500 positions -> pre-LN transformer
blocks (valid positions see only valid positions) -> avg-pool (k=2, s=2) -> 750 frames -> LayerNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from af3.attention import additive_mask, attention
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


# On the CPU, windows of different lengths run one at a time, each over its own valid positions:
# no attention over padding and no mask. On a corpus's length-sorted batches of 8 (1-60 s clips,
# tiny model) that measured 15-18% less encoder time than one masked batch. Elsewhere the windows
# run as one batch (padded keys masked), which keeps an accelerator busy with fewer launches.
_CPU_WINDOWS_ALONE = True


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
        # Valid positions see only valid positions, so positions past the longest window's valid
        # length cannot change any valid output: drop them, and the mel frames only they see
        # (a 5 s clip needs 1/6 of the work). Keep an even count so the pool's pairs stay aligned.
        valid = conv_length(mel_lengths)  # (n,)
        t = min(self.cfg.max_source_positions, max(2, 2 * ((int(valid.max()) + 1) // 2)))
        # Position j (conv2: kernel 3, stride 2) sees conv1 outputs 2j-1..2j+1, and those see mel
        # frames 2j-2..2j+2: t positions need 2t + 1 frames. conv1's last output there would see a
        # frame that was cut off, but only position t reads it, and it is dropped.
        x = F.gelu(self.conv1(input_features[..., : 2 * t + 1]))  # (n, d, <= 2T + 1)
        x = F.gelu(self.conv2(x))[..., :t]  # (n, d, T)
        x = x.transpose(1, 2) + self.embed_positions.weight[:t]  # (n, T, d)

        lengths = valid.clamp(1, t).tolist()  # a window with no valid frame is unused: give it one
        if min(lengths) == t:
            x = self._blocks(x, None)
        elif x.device.type == "cpu" and _CPU_WINDOWS_ALONE:
            # Each window alone over its own valid positions; its padded positions come out zero.
            x = torch.cat([F.pad(self._blocks(x[i: i + 1, :n], None), (0, 0, 0, t - n))
                           for i, n in enumerate(lengths)])  # (n, T, d)
        else:
            # One batch; only keys are masked: padded positions still get (unused) outputs.
            keys = torch.arange(t, device=x.device) < torch.tensor(lengths, device=x.device)[:, None]  # (n, T)
            x = self._blocks(x, keys[:, None, None, :])  # mask (n, 1, 1, T)
        return self._pool(x)  # (n, T/2, d)

    def _blocks(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The transformer blocks over (B, T, d); `mask` (B, 1, 1, T) marks the keys to attend to."""
        if mask is not None:
            mask = additive_mask(mask, x.dtype)  # once here, where SDPA would convert it in every layer
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """(n, T, d) -> (n, T/2, d): AF3's average pool over pairs of positions, then LayerNorm."""
        x = F.avg_pool1d(x.transpose(1, 2), kernel_size=2, stride=2).transpose(1, 2)  # (n, T/2, d)
        return layer_norm(x, self.norm)
