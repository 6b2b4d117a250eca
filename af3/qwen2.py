"""The Qwen2 decoder (Qwen2.5-7B in AF3) and its preallocated KV cache.

RMSNorm (fp32 inside), RoPE in rotate-half form, grouped-query attention with q/k/v bias and no
o bias, SwiGLU MLP, final norm, lm_head (or the embedding matrix when tied).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from af3.attention import attention
from af3.config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)  # cast back before the gain, as Qwen2 does


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, head_dim) for integer positions (B, T); angles in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                             device=position_ids.device) / head_dim))
    angles = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, hd): rotate-half pairs i with i + hd/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hd) rotated by position; cos/sin (B, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache(nn.Module):
    """Keys and values of every layer, preallocated and written in place at `length`.

    k, v: (n_layers, B, kv_heads, max_len, head_dim), non-persistent buffers (never saved).
    Lifecycle: a forward pass writes its T new positions at [length, length + T) in every layer,
    then advances `length` by T; `reset()` starts over without reallocating.
    """

    def __init__(self, n_layers: int, batch_size: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (n_layers, batch_size, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.length = 0  # positions filled so far

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        self.length = 0

    def check_room(self, batch_size: int, n_new: int) -> None:
        """ValueError unless `n_new` more positions of a batch of `batch_size` fit."""
        if batch_size != self.batch_size:
            raise ValueError(f"cache was made for batch size {self.batch_size} but the input has "
                             f"batch size {batch_size}")
        if self.length + n_new > self.max_len:
            raise ValueError(f"cache is full: {self.length} positions filled + {n_new} new > max_len "
                             f"{self.max_len}; make a larger one with model.new_cache(...)")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, kv_heads, T, hd) of `layer` at `length`; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, kv_heads, end, hd)

    def advance(self, n: int) -> None:
        self.length += n


class DecoderAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (cfg.num_attention_heads,
                                                        cfg.num_key_value_heads, cfg.head_dim)
        d = cfg.hidden_size
        self.q = nn.Linear(d, self.n_heads * self.head_dim)
        self.k = nn.Linear(d, self.n_kv_heads * self.head_dim)
        self.v = nn.Linear(d, self.n_kv_heads * self.head_dim)
        self.o = nn.Linear(self.n_heads * self.head_dim, d, bias=False)  # Qwen2: no o bias
        self.use_sdpa = True

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd), S = past + T
            k, v = k.to(q.dtype), v.to(q.dtype)  # no-op unless the cache was made in another dtype
        # mask None: no padding and no history, so plain causal attention.
        y = attention(q, k, v, mask, scale=self.head_dim**-0.5, causal=mask is None, use_sdpa=self.use_sdpa)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, d)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = DecoderAttention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


def causal_mask(attention_mask: torch.Tensor | None, start: int, t: int,
                device: torch.device) -> torch.Tensor:
    """Bool (B or 1, 1, T, start + T): query i (at position start + i) sees key j <= start + i
    that the 2-D `attention_mask` (B, start + T) marks as real (nonzero)."""
    q_pos = torch.arange(start, start + t, device=device)
    k_pos = torch.arange(start + t, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    return mask


class Qwen2Decoder(nn.Module):
    """Token embeddings -> decoder layers -> final RMSNorm; `logits` applies the LM head."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied: the embedding matrix doubles as the LM head, and no lm_head tensor exists.
        self.lm_head = (None if cfg.tie_word_embeddings
                        else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False))
        # Training: recompute each layer's activations in the backward pass instead of keeping them.
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x: input embeddings (B, T, d); position_ids (B or 1, T); mask: bool (B or 1, 1, T, S),
        or None for plain causal attention over the T tokens (no padding, empty cache)."""
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        # Through the module when untied, so that a LoRA adapter or a quantized head (af3/quant.py)
        # on lm_head takes part.
        return F.linear(h, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)
