"""Scaled dot-product attention shared by the encoder and the decoder.

Two paths that compute the same thing: PyTorch's fused `scaled_dot_product_attention` (the
default) and the plain math written out (what the tests compare against). Masks are boolean,
True where a query may look at a key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Query rows up to which attention on the CPU is written out in fp32 instead of SDPA (see `attention`).
FEW_ROWS = 4

# SDPA can share key/value heads between query heads itself from torch 2.5 (no copies of the cache).
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, T, hd) -> (B, kv_heads * n_rep, T, hd): each key/value head serves n_rep query heads."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
              scale: float, causal: bool = False, use_sdpa: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v.

    q: (B, H, Tq, hd); k, v: (B, H_kv, Tk, hd) with H a multiple of H_kv (GQA: query head i
    uses key/value head i // (H / H_kv)); mask: bool (B or 1, 1, Tq, Tk), or None. With mask
    None, `causal` selects a plain causal mask (Tq == Tk), which lets SDPA pick its fastest
    kernels. Returns (B, H, Tq, hd).
    Every query row of the mask must see at least one key (0/0 would be NaN): the mask builders
    (`qwen2.causal_mask`, the encoder's) let a row with nothing to see (padding) see every key.
    """
    b, h, tq, hd = q.shape
    h_kv = k.shape[1]
    n_rep = h // h_kv
    if (use_sdpa and q.device.type == "cpu" and tq <= FEW_ROWS
            and (q.dtype in (torch.bfloat16, torch.float16) or torch.compiler.is_compiling())):
        # A decoding step on the CPU. In half precision SDPA's CPU kernel takes ten times its
        # fp32 time for a few query rows (one row over 1040 keys, 14 heads: 682 us in bf16, 71 us
        # in fp32); under torch.compile it stays a separate call, where the written-out form is
        # fused into the step. So both write it out, in fp32, and cast back. Eager fp32 keeps
        # SDPA, which is as fast or faster there (0.39 against 0.42 ms a step at head size 12).
        if mask is None and causal:
            mask = torch.ones(tq, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - tq)[None, None]
        return _attention_fp32(q, k, v, mask, scale, n_rep)
    if use_sdpa:
        is_causal = causal and mask is None
        if _SDPA_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                                  enable_gqa=n_rep > 1)
        return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask,
                                              is_causal=is_causal, scale=scale)

    # Plain math, scores and softmax in fp32. The query heads that share a key/value head are
    # grouped on their own axis, so the keys and values are never copied.
    if mask is None and causal:
        mask = torch.ones(tq, k.shape[2], dtype=torch.bool, device=q.device).tril()[None, None]
    qg = q.view(b, h_kv, n_rep, tq, hd).float()  # (B, H_kv, n_rep, Tq, hd)
    scores = torch.matmul(qg, k.float()[:, :, None].transpose(-1, -2)) * scale  # (B, H_kv, n_rep, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))  # mask: (B, 1, 1, Tq, Tk)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v[:, :, None])  # (B, H_kv, n_rep, Tq, hd)
    return out.reshape(b, h, tq, hd)


def _attention_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                    n_rep: int) -> torch.Tensor:
    """`attention` computed in fp32 (or q's dtype, if wider) throughout, as SDPA's fused kernels
    accumulate, cast back to q's dtype; mask: bool (B or 1, 1, Tq, Tk), or None for none."""
    acc = torch.promote_types(q.dtype, torch.float32)
    b, h, tq, hd = q.shape
    h_kv = h // n_rep
    # The n_rep query heads of a key/value head share its keys: (n_rep * Tq) rows against them
    # in one product per head (a broadcast axis instead would make matmul copy the keys n_rep times).
    qg = q.reshape(b, h_kv, n_rep * tq, hd).to(acc)
    scores = torch.matmul(qg, k.to(acc).transpose(-1, -2)) * scale  # (B, H_kv, n_rep * Tq, Tk)
    if mask is not None:
        scores = scores.view(b, h_kv, n_rep, tq, -1).masked_fill(~mask[:, :, None], float("-inf"))
        scores = scores.view(b, h_kv, n_rep * tq, -1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v.to(acc))  # (B, H_kv, n_rep * Tq, hd)
    return out.view(b, h, tq, hd).to(q.dtype)
