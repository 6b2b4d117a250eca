"""LoRA: low-rank adapters added in place to a loaded AF3 model, saved and read in PEFT's format.

A targeted Linear  y = x W^T + b  becomes

    y = x W^T + b + scale * dropout(x) A^T B^T      A (r, in), B (out, r), scale = alpha / r

with W and b frozen and only A and B trained. B starts at zero, so a fresh adapter leaves the
model's output unchanged; A starts like nn.Linear's weight (Kaiming-uniform), as in PEFT.
`merge` folds scale * B @ A into W (no extra cost at inference), `unmerge` takes it out again.

Targets are af3 module names, matched with shell-style wildcards (`decoder.layers.*.attn.q`);
the projections af3 merges (q, k and v in `attn.qkv`) are named apart, as HF names them, and
each adapts its own rows of the merged linear.
On disk an adapter is what HF PEFT writes for AudioFlamingo3ForConditionalGeneration:
`adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight`, the HF module names coming from
the one name map (`weights_convert/names.py`). `python -m weights_convert --adapter` merges such a
folder into a checkpoint, and `peft.PeftModel.from_pretrained` puts it on the HF model.
"""

from __future__ import annotations

import fnmatch
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from af3.config import is_int, is_number, write_json
from af3.qwen2 import merged_parts
from weights_convert.lora import LoraAdapter
from weights_convert.names import af3_to_hf, hf_to_af3
from weights_convert.safetensors_io import read_tensor

# Qwen2's attention and MLP projections: what LoRA fine-tuning of a decoder usually targets.
DECODER_TARGETS = tuple(f"decoder.layers.*.{m}" for m in
                        ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"))
ENCODER_ATTENTION_TARGETS = tuple(f"encoder.layers.*.attn.{m}" for m in "qkvo")
PROJECTOR_TARGETS = ("projector.linear1", "projector.linear2")
TARGET_GROUPS = {"decoder": DECODER_TARGETS, "encoder-attention": ENCODER_ATTENTION_TARGETS,
                 "projector": PROJECTOR_TARGETS}
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class LoRA(nn.Module):
    """One adapter's update scale * dropout(x) A^T B^T, A (r, in), B (out, r).

    The factors are float32 whatever the base dtype (as PEFT does for bf16 / fp16 bases)."""

    def __init__(self, n_in: int, n_out: int, rank: int, scale: float, dropout: float, device: torch.device):
        super().__init__()
        self.rank, self.scale = rank, scale
        self.lora_A = nn.Parameter(torch.empty(rank, n_in, device=device))
        self.lora_B = nn.Parameter(torch.zeros(n_out, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale

    def delta(self) -> torch.Tensor:
        """scale * B @ A, (out, in) in float32: what merging adds to the weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


class LoRALinear(nn.Module):
    """A frozen Linear plus trainable low-rank updates: `adapters[part]` adds to the output
    rows `rows[part]`.

    A plain linear has one part, all of its rows, named as the linear itself (`attn.o`'s part
    is `o`); a merged one (qwen2.py: `attn.qkv`) has one per projection it
    merges (`q`, `k`, `v`), each adapted or not. It keeps the Linear's `weight` and `bias`
    Parameters under the same names, so the model's state dict still names the base weights as
    before (`…attn.q.weight`).
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = nn.ModuleDict()
        self.rows: dict[str, tuple[int, int]] = {}
        self.merged = False

    def add(self, part: str, rows: tuple[int, int], rank: int, scale: float, dropout: float) -> LoRA:
        adapter = LoRA(self.in_features, rows[1] - rows[0], rank, scale, dropout, self.weight.device)
        self.adapters[part], self.rows[part] = adapter, rows
        return adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.merged:
            for part, adapter in self.adapters.items():
                start, stop = self.rows[part]
                y = y + F.pad(adapter(x).to(y.dtype), (start, self.out_features - stop))  # zero on other rows
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: Sequence[str] = DECODER_TARGETS) -> list[str]:
    """Put a LoRA adapter on every linear of `model` whose name matches one of `targets`.

    Freezes every other parameter: afterwards only the adapters' A and B train. `targets` are
    name patterns (`*` any run of characters, `decoder.layers.*.attn.q`) over the model's
    linears, the projections a merged linear holds named apart (`attn.q`, `attn.k`, `attn.v`
    in `attn.qkv`), as HF and PEFT name them; every pattern must match at least one. Returns
    the names of the adapted linears.
    """
    if not is_int(rank) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not is_number(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if not is_number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    found = _match(model, targets)
    _freeze(model)
    for where in found.values():
        _wrap(model, where, rank, alpha / rank, dropout)
    return list(found)


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Put the PEFT LoRA adapter saved in `directory` on `model`, without merging it.

    Reads what `save_adapter` and HF PEFT write, and NVIDIA's thinking-mode adapter (the `think/`
    or `stage35/` folder of nvidia/audio-flamingo-3, whose module names are NVIDIA's): every
    spelling goes through the converter's name map. Freezes the rest of the model, like
    `add_lora`. Returns the names of the adapted modules.
    """
    adapter = LoraAdapter(directory, hf_to_af3)
    linears = adaptable(model)
    plan = []
    for target, pair in sorted(adapter.pairs.items()):
        name = target.removesuffix(".weight")
        if name not in linears:
            raise ValueError(f"adapter {directory}: targets {name}, which this model does not have")
        _check_linear(model, name, linears[name])
        module, (start, stop) = model.get_submodule(linears[name][0]), linears[name][2]
        (_, n_in), (n_out, _) = pair.a.shape, pair.b.shape
        if (n_in, n_out) != (module.in_features, stop - start):
            raise ValueError(f"adapter {directory}: {name} takes {module.in_features} -> {stop - start} "
                             f"features but the adapter's factors are for {n_in} -> {n_out}")
        plan.append((name, pair))
    _freeze(model)
    for name, pair in plan:
        layer = _wrap(model, linears[name], pair.a.shape[0], pair.scale, 0.0)
        with open(pair.a.path, "rb") as f, torch.no_grad():
            layer.lora_A.copy_(read_tensor(f, pair.a))
            layer.lora_B.copy_(read_tensor(f, pair.b))
    return [name for name, _ in plan]


def lora_layers(model: nn.Module) -> dict[str, LoRA]:
    """The model's adapters by the name of the linear each adapts (`…attn.q`), in module order."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            parent = name.rpartition(".")[0]
            out.update((f"{parent}.{part}" if parent else part, adapter) for part, adapter in m.adapters.items())
    return out


def merge(model: nn.Module) -> None:
    """Fold every adapter into its weight (W += scale * B @ A); the forward pass skips the factors.

    In fp32 `unmerge` restores the weight to rounding; in bf16 / fp16 the round trip loses bits.
    """
    _fold(model, +1)


def unmerge(model: nn.Module) -> None:
    """Undo `merge`: W -= scale * B @ A, and the adapters act separately again."""
    _fold(model, -1)


@torch.no_grad()
def _fold(model: nn.Module, sign: int) -> None:
    _layers(model)  # raises if there are none
    for m in model.modules():
        if isinstance(m, LoRALinear) and m.merged != (sign > 0):
            for part, adapter in m.adapters.items():
                start, stop = m.rows[part]
                m.weight[start:stop] += sign * adapter.delta().to(m.weight.dtype)
            m.merged = sign > 0


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' factors under PEFT's key names (HF module names), as saved."""
    out = {}
    for name, layer in _layers(model).items():
        hf = af3_to_hf(name)
        out[f"{_PEFT_PREFIX}{hf}.lora_A.weight"] = layer.lora_A.detach()
        out[f"{_PEFT_PREFIX}{hf}.lora_B.weight"] = layer.lora_B.detach()
    return out


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False,
                 base_model: str | None = None) -> Path:
    """Write the model's adapters as a PEFT LoRA adapter folder; returns its path.

    The folder appears complete or not at all (written beside it, then renamed). `overwrite`
    replaces an earlier adapter folder, never a folder that does not hold one. `base_model` is
    recorded as `base_model_name_or_path` (e.g. "nvidia/audio-flamingo-3-hf").
    """
    config, tensors = adapter_files(model, base_model)
    return write_folder(directory, overwrite, {CONFIG_FILE: config, WEIGHTS_FILE: tensors},
                        what="adapter", marker=CONFIG_FILE)


def adapter_files(model: nn.Module, base_model: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The contents of adapter_config.json and adapter_model.safetensors (tensors on the CPU)."""
    layers = _layers(model)
    shapes = {(layer.rank, layer.scale) for layer in layers.values()}
    if len(shapes) != 1:
        raise ValueError(f"the adapters differ in rank or scale {sorted(shapes)}; one PEFT adapter "
                         "folder holds one rank and one alpha")
    ((rank, scale),) = shapes
    dropouts = {layer.dropout.p for layer in layers.values() if isinstance(layer.dropout, nn.Dropout)}
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": scale * rank, "lora_dropout": max(dropouts, default=0.0),
        # Full HF module names: bare "q_proj" would match the audio encoder's q_proj too.
        "target_modules": sorted(af3_to_hf(name) for name in layers),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }
    return config, {k: v.cpu().contiguous() for k, v in adapter_tensors(model).items()}


def write_folder(directory: str | os.PathLike, overwrite: bool, files: dict[str, dict], *, what: str,
                 marker: str) -> Path:
    """Write `files` (name -> JSON dict, or name -> tensors for a .safetensors name) into a new folder.

    Written into a temporary folder beside `directory` and renamed into place, so a reader never
    sees half of it. An existing `directory` is replaced only with `overwrite` and only if it
    holds `marker` (it is one of ours).
    """
    directory = Path(directory)
    if directory.exists():
        if not overwrite:
            raise FileExistsError(f"{directory} exists; pass overwrite=True to replace the {what} there")
        if not (directory / marker).is_file():
            raise ValueError(f"{directory} exists and is not an {what} folder (no {marker}); not replacing it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name, content in files.items():
            if name.endswith(".safetensors"):
                save_file(content, str(tmp / name), metadata={"format": "pt"})
            else:
                write_json(tmp / name, content)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _layers(model: nn.Module) -> dict[str, LoRA]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters; add them with af3.lora.add_lora or load_adapter")
    return layers


def adaptable(model: nn.Module) -> dict[str, tuple[str, str, tuple[int, int]]]:
    """What a LoRA target may name: every module of the model, a merged linear's projections
    apart (qwen2.Merged) instead of it -> (the module holding it, its part name there, its
    output rows)."""
    out = {name: (merged, name.rpartition(".")[2], (start, stop))
           for name, (merged, start, stop, _) in merged_parts(model).items()}
    held = {merged for merged, _, _ in out.values()}
    for name, m in model.named_modules():  # every other module (`_check_linear` refuses non-linears)
        if name and name not in held:
            out[name] = (name, name.rpartition(".")[2], (0, getattr(m, "out_features", 0)))
    return out


def _match(model: nn.Module, targets: Sequence[str]) -> dict[str, tuple[str, str, tuple[int, int]]]:
    """The linears `targets` name, checked, with where `adaptable` says each is."""
    if isinstance(targets, str) or not isinstance(targets, Sequence) or not targets:
        raise TypeError(f"targets must be a non-empty list of module-name patterns, got {targets!r}")
    linears = adaptable(model)
    names: list[str] = []
    for pattern in targets:
        if not isinstance(pattern, str):
            raise TypeError(f"a target must be a module-name pattern (str), got {pattern!r}")
        found = [name for name in linears if fnmatch.fnmatchcase(name, pattern)]
        merged = sorted({module for module, _, _ in linears.values() if fnmatch.fnmatchcase(module, pattern)})
        if not found and merged:
            parts = [name for name, (module, _, _) in linears.items() if module == merged[0]]
            raise ValueError(f"LoRA target {pattern!r} names {merged[0]}, which merges {', '.join(parts)}: "
                             "target those (each adapts its own rows)")
        if not found:
            raise ValueError(f"LoRA target {pattern!r} matches no module of the model (module names look "
                             "like 'decoder.layers.0.attn.q', 'encoder.layers.0.attn.o', 'projector.linear1')")
        names += [name for name in found if name not in names]
    for name in names:
        _check_linear(model, name, linears[name])
    return {name: linears[name] for name in names}


def _check_linear(model: nn.Module, name: str, where: tuple[str, str, tuple[int, int]]) -> None:
    module_name, part, _ = where
    module = model.get_submodule(module_name)
    held = "" if module_name == name else f" (in {module_name})"
    if isinstance(module, LoRALinear):
        if part in module.adapters:
            raise ValueError(f"{name} already has a LoRA adapter")
        return
    if not isinstance(module, nn.Linear):  # nn.Linear or qwen2.Linear; the quantized ones are not
        raise TypeError(f"LoRA needs a float nn.Linear, but {name}{held} is a {type(module).__name__}: quantized "
                        "or other modules cannot take an adapter (load the checkpoint without quantization "
                        "to fine-tune it)")
    if not module.weight.is_floating_point():
        raise TypeError(f"LoRA needs floating-point weights, but {name}{held} has {module.weight.dtype}")


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _wrap(model: nn.Module, where: tuple[str, str, tuple[int, int]], rank: int, scale: float,
          dropout: float) -> LoRA:
    """Add an adapter where `adaptable` says a linear is (a merged linear's part: its rows)."""
    module_name, part, rows = where
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    layer = getattr(parent, child)
    if not isinstance(layer, LoRALinear):
        layer = LoRALinear(layer)
        setattr(parent, child, layer)
    return layer.add(part, rows, rank, scale, dropout)
