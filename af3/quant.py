"""Weight-only int8 and int4 for the decoder's linear layers: packing, kernels, modules.

What is quantized: every linear weight of the Qwen2 decoder (attn q, k, v, o; mlp gate, up,
down) and the untied LM head. Embeddings, norms, biases, the audio encoder and the projector
stay floating point (README, "Smaller weights: int8 and int4", says why and what each costs).

Tensor names in a quantized checkpoint, for a linear `<name>` with N outputs and K inputs:

    int8  <name>.weight  I8   (N, K)       q in [-127, 127]
          <name>.scales  BF16 (N,)         w[n, k] ~= q[n, k] * scales[n]
    int4  <name>.weight  U8   (N, K / 2)   two 4-bit q in [0, 15] a byte: column 2j in the high
                                           nibble, column 2j + 1 in the low one
          <name>.scales  BF16 (N, K / G)   G = group size, consecutive inputs sharing one scale
          <name>.zeros   BF16 (N, K / G)   w[n, k] ~= (q[n, k] - 8) * scales[n, k // G]
                                                      + zeros[n, k // G]
    <name>.bias stays as it is (float). config.json records {"scheme": ..., "group_size": ...}.

int8 is symmetric with one scale per output channel; int4 is asymmetric: 16 levels over the
part of each group's [min, max] with the smallest squared error (`int4_ranges` searches it),
with the "zero" written as the value of level 8: the convention of PyTorch's int4 matmul
kernels, so the stored numbers go to them unchanged.

Kernels (measured on this project's CPU, README): `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu` are fast with bf16 activations and many times slower than a
float matmul with fp32 ones, so the quantized layers compute in bf16 and hand back the input's
dtype. On CUDA int4 uses `_weight_int4pack_mm` (bf16) and int8 dequantizes one layer per call.
A shape no kernel takes (an int4 layer whose N is not a multiple of 16 on CPU) dequantizes
that one layer per call, never the whole model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from af3.config import INT4_GROUP_SIZES, QuantConfig
from af3.qwen2 import merged_parts, parameter_names

SCALE_DTYPE = torch.bfloat16  # scales and zeros, on disk and in memory
COMPUTE_DTYPE = torch.bfloat16  # the activations the CPU kernels are fast with
DECODER_LINEARS = ("attn.qkv", "attn.o", "mlp.gate", "mlp.up", "mlp.down")  # q/k/v merged (qwen2.py)
_QUANTIZE_BLOCK_ELEMENTS = 2**22  # weights quantized at a time (16 MB of float32 per work copy)
_INT4_ROW_CHUNK = 64 * 64  # rows repacked at a time; the CPU layout works in blocks of 64 rows


# ---- which layers -----------------------------------------------------------------------------

def quantized_linear_names(model: nn.Module) -> list[str]:
    """Module names of the linears a quantized AF3 holds in int8/int4, e.g. decoder.layers.0.attn.qkv."""
    names = [f"decoder.layers.{i}.{lin}" for i in range(len(model.decoder.layers)) for lin in DECODER_LINEARS]
    if model.decoder.lm_head is not None:  # a tied head is the embedding matrix, which stays float
        names.append("decoder.lm_head")
    return names


def quantized_weight_names(model: nn.Module) -> list[str]:
    """State-dict names of the weights of `quantized_linear_names`: a merged linear's by its
    parts' names (decoder.layers.0.attn.q.weight, ...k.weight, ...v.weight)."""
    apart: dict[str, list[str]] = {}
    for part, (merged, *_) in merged_parts(model).items():
        apart.setdefault(merged, []).append(part)
    return [f"{name}.weight" for linear in quantized_linear_names(model) for name in apart.get(linear, [linear])]


def replace_linears(model: nn.Module, qc: QuantConfig) -> list[str]:
    """Swap the decoder's nn.Linear layers for quantized ones (empty, on the same device).

    Meant for a model built on the meta device, before its weights are assigned. Returns the
    state-dict names of the weights now quantized (`<module>.weight`, a merged linear's parts'
    names: `attn.q.weight`, `attn.k.weight`, ...).
    """
    for name in quantized_linear_names(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is a {type(old).__name__}, not an nn.Linear: already quantized?")
        new = make_linear(qc, old.in_features, old.out_features, old.bias is not None,
                          device=old.weight.device, where=name)
        setattr(parent, attr, new)
    return quantized_weight_names(model)


def make_linear(qc: QuantConfig, in_features: int, out_features: int, bias: bool, *,
                device: torch.device | str | None = None, where: str = "linear") -> nn.Module:
    if qc.scheme == "int8":
        return Int8Linear(in_features, out_features, bias, device=device)
    check_group_size(qc.group_size, in_features, where)
    return Int4Linear(in_features, out_features, qc.group_size, bias, device=device)


def check_group_size(group_size: int, in_features: int, where: str) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if in_features % group_size:
        fits = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
        raise ValueError(f"{where}: int4 group size {group_size} does not divide its {in_features} "
                         f"inputs; use one of {fits}" if fits else
                         f"{where}: its {in_features} inputs are not a multiple of any int4 group "
                         f"size {INT4_GROUP_SIZES}; quantize with int8")


# ---- packing ----------------------------------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> q int8 (N, K), scales bf16 (N,); w ~= q * scales[:, None]."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(SCALE_DTYPE)  # (N,)
    # Rounded with the bf16 scale that is stored, so that no second rounding error is added.
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scales.float()[:, None]).to(dtype)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) float -> packed uint8 (N, K/2), scales and zeros bf16 (N, K/G).

    Each group's 16 levels span the part of its [min, max] range with the smallest squared
    error (`int4_ranges`), not always the whole range.
    """
    n, k = w.shape
    check_group_size(group_size, k, f"weight of shape {(n, k)}")
    g = w.float().reshape(n, k // group_size, group_size)  # (N, K/G, G)
    scales, zeros = int4_ranges(g)
    base = zeros.float() - 8 * scales.float()  # the value of level 0, as the kernels compute it
    q = torch.round((g - base[..., None]) / scales.float()[..., None]).clamp(0, 15)
    q = q.to(torch.uint8).reshape(n, k)
    return pack_int4(q), scales, zeros


# The search of `int4_ranges`: the ratios by which a group's range is shrunk about its middle,
# both ends alike, then each end alone moved from the best by these steps.
# A finer grid (0.975, 0.925, ...; nudges of 0.1) lowered the error of Gaussian weights by
# under 1% more, for almost twice the time.
INT4_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8)
INT4_NUDGE = (-0.05, 0.05)


def int4_ranges(g: torch.Tensor, search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups g (..., G) -> scales, zeros bf16 (...): the 16-level grid of each group.

    Without `search` the grid spans the group's [min, max] (round to nearest, "RTN"). With it,
    the range shrunk about its middle by each ratio of INT4_SHRINK is tried, then each end
    moved alone by INT4_NUDGE, and each group keeps the grid with the smallest squared error
    ([min, max] is the first candidate, so the error is never larger than RTN's). Clipping a
    group's few extreme weights costs them a larger error and buys all the others a finer step:
    on Gaussian weights the mean squared error drops by 13-15% (tests/bench_quant.py --accuracy).
    The weights alone decide: no calibration data.
    """
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (...)
    scales, zeros = _int4_grid(lo, hi)
    if not search:
        return scales, zeros
    best = _int4_squared_error(g, scales, zeros)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    a, b = torch.ones_like(lo), torch.ones_like(lo)  # the best grid's ends: mid - a * half, mid + b * half

    def trial(ta, tb) -> None:
        nonlocal best, scales, zeros, a, b
        s, z = _int4_grid(mid - ta * half, mid + tb * half)
        err = _int4_squared_error(g, s, z)
        better = err < best
        best, a, b = torch.where(better, err, best), torch.where(better, ta, a), torch.where(better, tb, b)
        scales, zeros = torch.where(better, s, scales), torch.where(better, z, zeros)

    for r in INT4_SHRINK[1:]:
        trial(r, r)
    start = a.clone()
    for d in INT4_NUDGE:
        trial(start + d, b)
    start = b.clone()
    for d in INT4_NUDGE:
        trial(a, start + d)
    return scales, zeros


def _int4_grid(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros, as stored (bf16), of 16 levels from lo to hi; zero = the value of level 8."""
    scales = ((hi - lo) / 15).clamp(min=1e-12).to(SCALE_DTYPE)
    zeros = (lo + 8 * scales.float()).to(SCALE_DTYPE)
    return scales, zeros


def _int4_squared_error(g: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Sum over each group (..., G) of the squared error of rounding it to its grid -> (...)."""
    s = scales.float()
    inv = 1 / s
    u = torch.addcmul(((8 * s - zeros.float()) * inv)[..., None], g, inv[..., None])  # in steps above level 0
    u.sub_(u.round().clamp_(0, 15)).square_()
    return u.sum(dim=-1) * s * s


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 (N, K) in [0, 15] -> (N, K/2): column 2j high nibble, 2j + 1 low nibble."""
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> q uint8 (N, K) in [0, 15]; the inverse of `pack_int4`."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_int4(packed).float()  # (N, K)
    n, k = q.shape
    q = q.reshape(n, k // group_size, group_size)
    w = (q - 8) * scales.float()[..., None] + zeros.float()[..., None]  # (N, K/G, G)
    return w.reshape(n, k).to(dtype)


def stored_shapes(qc: QuantConfig, out_features: int, in_features: int) -> dict[str, tuple[torch.dtype, tuple]]:
    """Suffix -> (dtype, shape) of the tensors one quantized (N, K) weight is stored as."""
    if qc.scheme == "int8":
        return {"weight": (torch.int8, (out_features, in_features)), "scales": (SCALE_DTYPE, (out_features,))}
    groups = (out_features, in_features // qc.group_size)
    return {"weight": (torch.uint8, (out_features, in_features // 2)), "scales": (SCALE_DTYPE, groups),
            "zeros": (SCALE_DTYPE, groups)}


def quantize_weight(w: torch.Tensor, qc: QuantConfig) -> dict[str, torch.Tensor]:
    """One float weight (N, K) -> its stored tensors, keyed by suffix ("weight", "scales"[, "zeros"]).

    Rows are quantized a block at a time (each row on its own), so that the float32 work
    copies stay small whatever the size of the weight: the real LM head is 151672 x 3584.
    """
    n, k = w.shape
    out = {suffix: torch.empty(shape, dtype=dt, device=w.device)
           for suffix, (dt, shape) in stored_shapes(qc, n, k).items()}
    rows = max(1, _QUANTIZE_BLOCK_ELEMENTS // k)
    for r in range(0, n, rows):
        block = w[r:r + rows]
        pieces = quantize_int8(block) if qc.scheme == "int8" else quantize_int4(block, qc.group_size)
        for t, piece in zip(out.values(), pieces):
            t[r:r + rows] = piece
    return out


# ---- modules ----------------------------------------------------------------------------------

class QuantizedLinear(nn.Module):
    """What Int8Linear and Int4Linear share: the bias, the reshape, and no training."""

    in_features: int
    out_features: int
    scheme: str

    def _init_bias(self, bias: bool, device) -> None:
        self.register_parameter("bias", nn.Parameter(torch.zeros(self.out_features, device=device))
                                if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x.reshape(-1, self.in_features))  # (M, N)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def train(self, mode: bool = True):
        if mode:
            raise ValueError(f"this model holds {self.scheme} weights, which cannot be trained: load "
                             "the float checkpoint (af3.load(path) without quantize=) to fine-tune")
        return super().train(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantizedLinear):
    """y = x @ (q * scales)^T + bias; q int8 (N, K), one bf16 scale per output channel."""

    scheme = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=SCALE_DTYPE, device=device))
        self._init_bias(bias, device)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device)
        m.weight, m.scales = quantize_int8(linear.weight.detach())
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone())
        return m

    def pack_for_kernel(self) -> None:
        # The CPU kernel crashes on data that is not aligned (tensors read in place from a
        # safetensors file sit at any byte offset): give it memory of its own.
        self.weight, self.scales = _aligned(self.weight), _aligned(self.scales)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return torch.ops.aten._weight_int8pack_mm(_aligned(x.to(COMPUTE_DTYPE)), self.weight,
                                                      self.scales.to(COMPUTE_DTYPE))
        return F.linear(x, dequantize_int8(self.weight, self.scales, x.dtype))  # this layer only

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scales)


class Int4Linear(QuantizedLinear):
    """y = x @ w^T + bias, w from 4-bit levels in groups of `group_size` inputs (see module doc).

    Loaded in the stored layout; `pack_for_kernel()` (af3.load calls it) rearranges the weight
    into the layout of the int4 kernel of its device, in place, one layer at a time. A packed
    layer cannot give back a state dict: checkpoints are written by weights_convert.
    """

    scheme = "int4"

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = True,
                 device=None):
        super().__init__()
        check_group_size(group_size, in_features, "Int4Linear")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=SCALE_DTYPE, device=device))
        self._init_bias(bias, device)
        self.kernel: str | None = None  # "cpu" or "cuda" once packed; None: dequantize per call

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        m = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None,
                device=linear.weight.device)
        m.weight, m.scales, m.zeros = quantize_int4(linear.weight.detach(), group_size)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone())
        return m

    def kernel_for(self, device: torch.device) -> str | None:
        """Which int4 kernel takes this layer on `device` (None: dequantize per call)."""
        if device.type == "cpu" and self.out_features % 16 == 0:
            return "cpu"
        if device.type == "cuda" and self.out_features % 8 == 0 and self.in_features % 32 == 0:
            return "cuda"
        return None

    def pack_for_kernel(self) -> None:
        if self.kernel is not None:
            return
        kernel = self.kernel_for(self.weight.device)
        if kernel is None:
            return
        w = self.weight
        if kernel == "cpu":
            out = torch.empty_like(w)
            for r in range(0, w.shape[0], _INT4_ROW_CHUNK):  # the int32 copy is one chunk at a time
                q = unpack_int4(w[r:r + _INT4_ROW_CHUNK]).to(torch.int32)
                out[r:r + _INT4_ROW_CHUNK] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        else:
            out = torch.ops.aten._convert_weight_to_int4pack(w.contiguous(), self._inner_k_tiles())
        # (K/G, N, 2): [scale, zero] of every group, the kernels' layout.
        sz = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).to(COMPUTE_DTYPE).contiguous()
        self.weight = out
        del self.scales, self.zeros
        self.register_buffer("scales_and_zeros", sz)
        self.kernel = kernel

    def _inner_k_tiles(self) -> int:
        return next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(_aligned(x.to(COMPUTE_DTYPE)), self.weight,
                                                             self.group_size, self.scales_and_zeros)
        if self.kernel == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x.to(COMPUTE_DTYPE), self.weight,
                                                     self.group_size, self.scales_and_zeros)
        return F.linear(x, self.dequantize().to(x.dtype))  # this layer only

    def dequantize(self) -> torch.Tensor:
        """The float weight (N, K) this layer stands for (from the stored layout only)."""
        if self.kernel is not None:
            raise ValueError("this Int4Linear is packed for the int4 kernel; dequantize before "
                             "pack_for_kernel()")
        return dequantize_int4(self.weight, self.scales, self.zeros, self.group_size)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.kernel is not None:
            raise ValueError(f"{prefix.rstrip('.')}: int4 weights are packed in the {self.kernel} "
                             "kernel's layout and cannot be saved from memory; write quantized "
                             "checkpoints with `python -m weights_convert SRC DST --quantize int4`")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, kernel={self.kernel}"


# ---- whole models -----------------------------------------------------------------------------

def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy of it in fresh memory when its data do not start on a 64-byte boundary:
    the CPU int8 kernel crashes (SIGSEGV) on activations or weights at 16-byte offsets (the CPU
    int4 kernel's inputs are aligned the same way)."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


def pack_for_kernels(model: nn.Module) -> None:
    """Make every quantized layer of `model` ready for its device's kernel, one layer at a time."""
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.pack_for_kernel()


@torch.no_grad()
def quantize_model(model: nn.Module, qc: QuantConfig) -> nn.Module:
    """Quantize an AudioFlamingo3 in memory, layer by layer, in place; returns it (eval mode).

    `af3.load(path, quantize=...)` does the same while reading, so that the float model never
    exists whole; this is for a model already in memory.
    """
    model.eval()
    for name in quantized_linear_names(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        if qc.scheme == "int8":
            setattr(parent, attr, Int8Linear.from_float(linear))
        else:
            check_group_size(qc.group_size, linear.in_features, name)
            setattr(parent, attr, Int4Linear.from_float(linear, qc.group_size))
        del linear
    model.config.quantization = qc
    pack_for_kernels(model)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


# ---- sizes ------------------------------------------------------------------------------------

def weight_bytes(config, qc: QuantConfig | None, float_dtype: torch.dtype) -> dict[str, int]:
    """Bytes of the weights of AudioFlamingo3(config) by part, stored with `qc` (None: all float).

    Parts: "decoder linears" (the ones quantized, with their scales and zeros), "embeddings",
    "decoder other" (norms, biases), "audio encoder", "projector". Computed on the meta device
    from the config, so the README's table for the real model comes from its dimensions.
    """
    from af3.model import AudioFlamingo3

    with torch.device("meta"):
        model = AudioFlamingo3(config)
    linears = {w.removesuffix(".weight") for w in quantized_weight_names(model)}
    if qc is not None:
        replace_linears(model, qc)
    params = parameter_names(model)  # in float_dtype; buffers keep theirs
    sizes = {"decoder linears": 0, "embeddings": 0, "decoder other": 0, "audio encoder": 0, "projector": 0}
    for name, t in model.state_dict().items():
        module, _, suffix = name.rpartition(".")
        if module in linears and suffix != "bias":
            part = "decoder linears"
        elif name.startswith("decoder.embed_tokens"):
            part = "embeddings"
        elif name.startswith("decoder."):
            part = "decoder other"
        elif name.startswith("encoder."):
            part = "audio encoder"
        else:
            part = "projector"
        sizes[part] += t.numel() * (float_dtype.itemsize if name in params else t.dtype.itemsize)
    return sizes
