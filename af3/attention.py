"""Scaled dot-product attention shared by the encoder and the decoder.

Two paths that compute the same thing: PyTorch's fused `scaled_dot_product_attention` (the
default) and the plain math written out (what the tests compare against). Masks are boolean,
True where a query may look at a key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, T, hd) -> (B, kv_heads * n_rep, T, hd): each key/value head serves n_rep query heads."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
              scale: float, causal: bool = False, use_sdpa: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v.

    q: (B, H, Tq, hd); k, v: (B, H_kv, Tk, hd) with H a multiple of H_kv (GQA);
    mask: bool, broadcastable to (B, H, Tq, Tk), or None. With mask None, `causal` selects a
    plain causal mask (Tq == Tk), which lets SDPA pick its fastest kernels. Returns (B, H, Tq, hd).
    A query row with no visible key (a left-padding position under a causal mask) would be
    0/0 = NaN; such rows are let see every key instead, so their (unused) output stays finite.
    """
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    if mask is not None:
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    if use_sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              scale=scale)
    if mask is None and causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    # Plain math; scores and softmax in fp32.
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)  # (B, H, Tq, hd)
