"""Scaled dot-product attention shared by the encoder and the decoder.

Two paths that compute the same thing: PyTorch's fused `scaled_dot_product_attention` (the
default) and the plain math written out (what the tests compare against, and what a decoding
step on the CPU takes in half precision or compiled). Masks are boolean, True where a query
may look at a key, or the same as an additive float mask (`additive_mask`).
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


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True where a query may look at a key) as the float mask SDPA adds to the
    scores: 0 there, -inf elsewhere. SDPA converts a bool mask to this on every call; a model
    converts its mask once per forward and hands the result to every layer."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
              scale: float, causal: bool = False, use_sdpa: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v.

    q: (B, H, Tq, hd); k, v: (B, H_kv, Tk, hd) with H a multiple of H_kv (GQA: query head i
    uses key/value head i // (H / H_kv)); mask (B or 1, 1, Tq or 1, Tk): bool, True where a query may
    look at a key, or its `additive_mask` in q's dtype; or None. With mask None, `causal` selects
    a plain causal mask (Tq == Tk), which lets SDPA pick its fastest kernels. Returns (B, H, Tq, hd).
    Every query row of the mask must see at least one key (0/0 would be NaN): `qwen2.causal_mask`
    lets a row with nothing to see (padding) see every key, and the encoder's mask always leaves
    a window's first frame visible.
    """
    b, h, tq, hd = q.shape
    h_kv = k.shape[1]
    n_rep = h // h_kv
    # A decoding step on the CPU: a few query rows, each reading every key and value.
    few_rows_on_cpu = q.is_cpu and tq <= FEW_ROWS
    # In half precision SDPA's CPU kernel takes ten times its fp32 time for a few query rows (one
    # row over 1040 keys, 14 heads: 682 us in bf16, 71 us in fp32); under torch.compile it stays a
    # separate call, where the written-out form is fused into the step. So both take the
    # written-out form below, in fp32 to the end.
    written_fp32 = few_rows_on_cpu and (q.dtype in (torch.bfloat16, torch.float16)
                                        or torch.compiler.is_compiling())
    if use_sdpa and not written_fp32:
        is_causal = causal and mask is None
        if few_rows_on_cpu and n_rep > 1 and not is_causal:
            # The n_rep query heads of a key/value head as n_rep * Tq query rows of one head:
            # SDPA's CPU kernel reads each head's keys and values once, where with enable_gqa it
            # reads them once per query head (tiny model's decode step: 35 against 66 us a layer
            # over 1092 keys).
            rows = q.reshape(b, h_kv, n_rep * tq, hd)  # row r * Tq + i: query i of head r in the group
            if mask is not None and tq > 1:  # one query row's mask serves every row as it is
                mask = mask.repeat(1, 1, n_rep, 1)  # (B or 1, 1, n_rep * Tq, Tk)
            return F.scaled_dot_product_attention(rows, k, v, attn_mask=mask, scale=scale).view(b, h, tq, hd)
        if _SDPA_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                                  enable_gqa=n_rep > 1)
        return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask,
                                              is_causal=is_causal, scale=scale)

    # Written out, scores and softmax in fp32 (or wider). The n_rep query heads of a key/value
    # head are (n_rep * Tq) rows of one product against its keys, so the keys and values are
    # never copied (a broadcast head axis would make matmul copy them n_rep times).
    if mask is None and causal:
        mask = torch.ones(tq, k.shape[2], dtype=torch.bool, device=q.device).tril()[None, None]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.reshape(b, h_kv, n_rep * tq, hd).to(acc)
    scores = torch.matmul(qg, k.to(acc).transpose(-1, -2)) * scale  # (B, H_kv, n_rep * Tq, Tk)
    if mask is not None:  # mask: (B or 1, 1, Tq, Tk), the same for each of the n_rep heads
        if mask.dtype == torch.bool:
            mask = additive_mask(mask, acc)
        scores = (scores.view(b, h_kv, n_rep, tq, -1) + mask[:, :, None]).view(b, h_kv, n_rep * tq, -1)
    # The 'math' backend weighs the values in their own dtype, as transformers' eager attention
    # does; a decoding step's fast path stays in fp32 to the end, as SDPA's kernels accumulate.
    values = acc if written_fp32 else v.dtype
    out = torch.matmul(torch.softmax(scores, dim=-1).to(values), v.to(values))  # (B, H_kv, n_rep * Tq, hd)
    return out.view(b, h, tq, hd).to(q.dtype)
