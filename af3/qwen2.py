"""The Qwen2 decoder (Qwen2.5-7B in AF3) and its preallocated KV cache.

RMSNorm (fp32 inside), RoPE in rotate-half form, grouped-query attention with q/k/v bias and no
o bias, SwiGLU MLP, final norm, lm_head (or the embedding matrix when tied). q/k/v are one
product (`Merged`), saved and loaded as separate projections (`attn.q`, `attn.k`, `attn.v`:
HF's q_proj, k_proj, v_proj, weights_convert/names.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from af3.attention import additive_mask, attention
from af3.config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one kernel: x * rsqrt(mean(x^2) + eps) * weight
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)  # normalized in fp32
        return self.weight * xf.to(x.dtype)  # cast back before the gain, as Qwen2 does


# `linear` takes products of at most SPLIT_ROWS rows on the CPU (a decode step's) its own way.
SPLIT_ROWS = 4
# Compiled, inductor sums an fp32 reduction of more than SUM_CHUNK elements through a helper
# kept in memory (cascade summation), where a shorter one stays in registers: the mid model's
# 4864-wide MLP down product read at 41% of the bandwidth that way, 66% summed as two chunks
# (tests/bench_mid.py's kernel lines). So a longer product is summed chunk by chunk.
SUM_CHUNK = 4096


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), faster for the few rows of a decode step on the CPU.

    A decode step multiplies one row per sequence by every weight matrix, so its speed is how
    fast the weights are read. MKL runs such a float32 product on one thread; split into one
    slice of output rows per thread, as a batched product, it reads the weight at the memory's
    speed (2-3x faster on 2 threads, `tests/bench_mid.py`). Small weights are split too: timed
    alone one runs faster unsplit (it stays in the core's L2 cache), but within a step the other
    weights push it out, and the tiny model's eager step was 8-11% faster with all its products
    split (three runs of 15-80 interleaved rounds). Under torch.compile the product is written
    as a multiply and a sum (in chunks of at most SUM_CHUNK), which inductor fuses into one
    kernel that reads the weight once on every thread, in any dtype (sums in fp32, as
    F.linear's). Each output is the same dot product summed in another order: equal to F.linear
    to float precision, not bit for bit.
    """
    n, k = weight.shape
    rows = x.numel() // k
    if rows > SPLIT_ROWS or not x.is_cpu:
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        c = _chunks(k)
        xs = x.float().unflatten(-1, (c, k // c))[..., None, :]  # (..., c, 1, K / c)
        w = weight.float().reshape(n, c, k // c).transpose(0, 1)  # (c, N, K / c), no copy
        y = (xs * w).sum(-1).sum(-2)  # (..., c, N) partial sums, then (..., N)
        return (y if bias is None else y + bias.float()).to(x.dtype)
    threads = torch.get_num_threads()
    if (threads == 1 or n % threads or not weight.is_contiguous()
            or weight.dtype != torch.float32 or x.dtype != torch.float32 or torch.is_grad_enabled()):
        return F.linear(x, weight, bias)
    xt = x.reshape(rows, k).t().expand(threads, k, rows)  # (threads, K, M), no copy
    y = torch.bmm(weight.view(threads, n // threads, k), xt)  # (threads, N / threads, M)
    y = y.permute(2, 0, 1).reshape(*x.shape[:-1], n).contiguous()  # (..., N)
    if bias is not None:
        y += bias
    return y


def _chunks(k: int) -> int:
    """The fewest equal chunks of at most SUM_CHUNK elements a reduction of k splits into (1 for
    k <= SUM_CHUNK, or if no count up to 64 divides k)."""
    return next((c for c in range(-(-k // SUM_CHUNK), 65) if k % c == 0), 1)


class Linear(nn.Linear):
    """nn.Linear through `linear` (same weights, same state dict names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (B, 1, T, head_dim) for integer positions (B, T), to broadcast over
    the heads; angles in fp32.

    Rotate-half RoPE pairs element i with i + head_dim/2, at the same angle:
    x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1). `apply_rope` reads the
    halves swapped as (x2, x1), so the sign moves into sin: (-sin, sin)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                             device=position_ids.device) / head_dim))
    angles = position_ids[:, None, :, None].float() * inv_freq  # (B, 1, T, hd/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hd) rotated by position; cos, signed sin (B, 1, T, hd) from `rope_cos_sin`."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin  # roll: (x2, x1)


class KVCache:
    """Keys and values of every layer, preallocated; written only by `update`, where the caller says.

    k[i], v[i]: layer i's keys and values (B, kv_heads, max_len, head_dim), one tensor per
    layer (torch.compile writes a whole tensor in place, where it would copy one layer's slice
    of a shared tensor every step). Never saved. The cache does not count tokens: whoever
    feeds the model names the slot of each new token (`input_pos`) and which slots hold real
    tokens (the attention mask, causal up to the query's slot). A slot written by a turn that
    was then abandoned is simply written again. `grow` makes room for a longer sequence and
    keeps every key and value written so far.

    On CUDA each tensor is marked as having a fixed address, so a compiled decode step that
    writes it in place can still run as a CUDA graph (torch.compile's CUDA graphs take only
    inputs at fixed addresses as tensors they may write).
    """

    def __init__(self, n_layers: int, batch_size: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.k = [_fixed(torch.zeros(shape, dtype=dtype, device=device)) for _ in range(n_layers)]
        self.v = [_fixed(torch.zeros(shape, dtype=dtype, device=device)) for _ in range(n_layers)]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, kv_heads, T, hd) of `layer` at slots `input_pos` (T,); return the whole
        layer's keys and values (B, kv_heads, max_len, hd)."""
        k_all, v_all = self.k[layer], self.v[layer]
        if k.dtype != k_all.dtype:  # a cache kept in another dtype than the model's
            k, v = k.to(k_all.dtype), v.to(v_all.dtype)
        k_all.index_copy_(2, input_pos, k)
        v_all.index_copy_(2, input_pos, v)
        return k_all, v_all

    def grow(self, max_len: int) -> None:
        """Room for `max_len` positions, the slots written so far kept (one copy; callers double
        the size so a growing chat copies O(1) per token, amortised)."""
        if max_len <= self.max_len:
            return
        for tensors in (self.k, self.v):
            for i, old in enumerate(tensors):
                new = old.new_zeros(*old.shape[:2], max_len, old.shape[3])
                new[:, :, :old.shape[2]] = old
                tensors[i] = _fixed(new)

    def row(self, b: int) -> KVCache:
        """A cache over row b alone: views of this one's tensors, so writes land here."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = [t[b:b + 1] for t in self.k], [t[b:b + 1] for t in self.v]
        return view

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (1-D indices), in that order."""
        self.k = [_fixed(t.index_select(0, rows)) for t in self.k]
        self.v = [_fixed(t.index_select(0, rows)) for t in self.v]


def _fixed(t: torch.Tensor) -> torch.Tensor:
    """t, marked on CUDA as a tensor whose address stays the same from one call to the next."""
    if t.is_cuda:
        torch._dynamo.mark_static_address(t)
    return t


# q, k and v read the same input, so they are one weight, gpt-fast style (its `wqkv`): one
# kernel call where three small ones would each pay a call's overhead (a decode step's products
# are a few rows each). Checkpoints, state dicts, LoRA targets and PEFT adapters still name HF's
# separate projections: `Merged.parts` says which rows of a merged weight each one is;
# `split_state` / `join_state` convert state dicts between the two. (gate and up stay apart:
# see MLP.)

class Merged(nn.Module):
    """A module with merged linears, saved and loaded under their parts' names. `parts`: merged
    linear's name -> {part name: its rows}, set by the subclass."""

    parts: dict[str, dict[str, tuple[int, int]]]

    def __init__(self):
        super().__init__()
        self._register_state_dict_hook(split_state)
        self._register_load_state_dict_pre_hook(join_state, with_module=True)


# Tensors of a merged linear (float or quantized, af3/quant.py) whose rows are its outputs.
ROW_TENSORS = ("weight", "bias", "scales", "zeros")


def split_state(module: nn.Module, state: dict, prefix: str, _metadata: Any) -> None:
    """State-dict hook: a merged linear's tensors as its parts' (views of the same rows; with
    keep_vars, a Parameter's parts are Parameters), in the order separate linears would have
    (q.weight, q.bias, k.weight, ...). The module's own entries are the last ones in `state`
    (the hook runs once its children are in): only those are taken out and put back."""
    own = []
    while state and next(reversed(state)).startswith(prefix):
        own.append(state.popitem())
    own = dict(reversed(own))
    merged = {f"{prefix}{name}.{suffix}": name for name in module.parts for suffix in ROW_TENSORS}
    for key, t in own.items():
        if key not in merged:
            state[key] = t
        elif key.endswith(".weight"):  # every merged linear has a weight: its parts go here
            name = merged[key]
            for part, (start, stop) in module.parts[name].items():
                for suffix in ROW_TENSORS:
                    whole = own.get(f"{prefix}{name}.{suffix}")
                    if whole is not None:
                        piece = whole[start:stop]
                        if isinstance(whole, nn.Parameter):
                            piece = nn.Parameter(piece, requires_grad=whole.requires_grad)
                        state[f"{prefix}{part}.{suffix}"] = piece


def join_state(module: nn.Module, state: dict, prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook: the parts' tensors, concatenated into the merged linear's."""
    for merged, parts in module.parts.items():
        for suffix in ROW_TENSORS:
            keys = [f"{prefix}{name}.{suffix}" for name in parts]
            if all(k in state for k in keys):
                state[f"{prefix}{merged}.{suffix}"] = torch.cat([state.pop(k) for k in keys])


def _parts(*sizes: tuple[str, int]) -> dict[str, tuple[int, int]]:
    """('q', 3), ('k', 1) -> {'q': (0, 3), 'k': (3, 4)}: each part's rows of the merged weight."""
    out, start = {}, 0
    for name, n in sizes:
        out[name], start = (start, start + n), start + n
    return out


def merged_parts(model: nn.Module) -> dict[str, tuple[str, int, int, int]]:
    """Each projection a merged linear holds, by the module name it has apart -> (the merged
    linear's name, the projection's first and last + 1 row there, the merged linear's rows),
    e.g. '…attn.k' -> ('…attn.qkv', 3584, 4096, 4608)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, Merged):
            for merged, parts in module.parts.items():
                rows = max(stop for _, stop in parts.values())
                out.update((f"{name}.{part}", (f"{name}.{merged}", start, stop, rows))
                           for part, (start, stop) in parts.items())
    return out


def parameter_names(model: nn.Module) -> set[str]:
    """State-dict names of the model's parameters (its other state-dict entries are buffers)."""
    return {name for name, t in model.state_dict(keep_vars=True).items() if isinstance(t, nn.Parameter)}


class DecoderAttention(Merged):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (cfg.num_attention_heads,
                                                        cfg.num_key_value_heads, cfg.head_dim)
        d, q_rows, kv_rows = cfg.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.parts = {"qkv": _parts(("q", q_rows), ("k", kv_rows), ("v", kv_rows))}
        self.qkv = Linear(d, q_rows + 2 * kv_rows)  # q, k, v (with biases) in one product
        self.o = Linear(q_rows, d, bias=False)  # Qwen2: no o bias
        self.use_sdpa = True

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, input_pos: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, nh + 2 nkv, T, hd)
        nh, nqk = self.n_heads, self.n_heads + self.n_kv_heads
        qk = apply_rope(qkv[:, :nqk], cos, sin)  # q and k, adjacent heads of qkv, rotated at once
        q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nqk:]
        if cache is not None:
            k_all, v_all = cache.update(self.layer_idx, input_pos, k, v)  # (B, nkv, max_len, hd)
            if mask is not None:  # without one, a prefill from empty: the new tokens attend to each other
                s = mask.shape[-1]  # the mask says how many slots to attend over
                k, v = k_all[:, :, :s], v_all[:, :, :s]
                if k.dtype != q.dtype:  # a cache kept in another dtype than the model's
                    k, v = k.to(q.dtype), v.to(q.dtype)
        # mask None: no padding and nothing cached before these tokens, so plain causal attention.
        y = attention(q, k, v, mask, scale=self.head_dim**-0.5, causal=mask is None, use_sdpa=self.use_sdpa)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, d)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)).

    gate and up stay two products, as in gpt-fast: merged, the tiny model's eager step was no
    faster, and its compiled step 7% slower (inductor fuses two reductions and silu(gate) * up
    into one loop, not one reduction over both halves and a second loop)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

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
                cache: KVCache | None, input_pos: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, input_pos)
        return x + self.mlp(self.mlp_norm(x))


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions (B, S) for a 2-D mask (B, S): the count of real tokens before each one, so
    left padding does not shift them (padding itself gets 0)."""
    real = attention_mask != 0
    return (real.long().cumsum(-1) - 1).masked_fill(~real, 0)


def causal_mask(attention_mask: torch.Tensor | None, input_pos: torch.Tensor, s: int) -> torch.Tensor:
    """Bool (B or 1, 1, T, S): the query in slot input_pos[i] sees key slot j <= input_pos[i]
    that the 2-D `attention_mask` (B, S) marks as real (nonzero). A query that would see no key
    (left padding) sees every key instead: its output is unused, and stays finite (not 0/0)."""
    mask = torch.arange(s, device=input_pos.device)[None, :] <= input_pos[:, None]  # (T, S)
    mask = mask[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
        mask = mask | ~mask.any(dim=-1, keepdim=True)
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
                        else Linear(cfg.hidden_size, cfg.vocab_size, bias=False))
        # Training: recompute each layer's activations in the backward pass instead of keeping them.
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x: input embeddings (B, T, d); position_ids (B or 1, T) for RoPE; mask: bool
        (B or 1, 1, T, S), or None for plain causal attention over the T tokens alone (no padding,
        and nothing cached before them). With a cache, the new keys/values go to slots `input_pos`
        (T,) and, with a mask, the queries attend over slots [0, S)."""
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        if mask is not None:
            mask = additive_mask(mask, x.dtype)  # once here, where SDPA would convert it in every layer
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, input_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, input_pos)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        # Through the module when untied, so that a LoRA adapter or a quantized head (af3/quant.py)
        # on lm_head takes part.
        return linear(h, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)
