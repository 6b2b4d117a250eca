"""Merge a PEFT LoRA adapter into the weights it targets: W += (alpha / r) * B @ A
(alpha / sqrt(r) with rsLoRA).

A PEFT adapter directory holds `adapter_config.json` (r, lora_alpha, target_modules, ...) and
`adapter_model.safetensors` with, per targeted Linear, `base_model.model.<module>.lora_A.weight`
(r, in) and `...lora_B.weight` (out, r). AF3's thinking mode ships this way (the `think/` or
`stage35/` folder of NVIDIA's checkpoint), wrapped around NVIDIA's model, so `<module>` may be
spelt in any of the layouts: `llm.model.layers.0.self_attn.q_proj`, HF's
`language_model.model.layers.0...` / `model.language_model.layers.0...`, or a bare Qwen2
`model.layers.0...`. Every spelling goes through the same name map as the base weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from af3.config import is_int, is_number
from weights_convert.layouts import read_json
from weights_convert.safetensors_io import TensorInfo, read_header, read_tensor

_PREFIX = "base_model.model."
# NVIDIA's module names -> HF's, so that names.py maps them (the projector has no LoRA in AF3).
_NVIDIA_PREFIXES = (("llm.", "language_model."), ("sound_tower.", "audio_tower."))


@dataclass
class LoraPair:
    a: TensorInfo  # (r, in)
    b: TensorInfo  # (out, r)
    scale: float


class LoraAdapter:
    """The LoRA factors of one PEFT adapter, keyed by the af3 name of the weight they update."""

    def __init__(self, directory: str | Path, to_af3: Callable[[str], str]):
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"adapter directory not found: {directory}")
        self.directory = directory
        where = directory / "adapter_config.json"
        if not where.is_file():
            raise FileNotFoundError(f"adapter {directory} is not a PEFT adapter directory (no "
                                    "adapter_config.json); point --adapter at the folder holding "
                                    "adapter_config.json and adapter_model.safetensors")
        cfg = read_json(where)
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA")
        for key in ("use_dora", "fan_in_fan_out"):
            if cfg.get(key):
                raise ValueError(f"{where}: {key}=true is not supported")
        for key in ("rank_pattern", "alpha_pattern"):
            if cfg.get(key):
                raise ValueError(f"{where}: per-module {key} is not supported")
        if cfg.get("modules_to_save"):
            raise ValueError(f"{where}: modules_to_save {cfg['modules_to_save']} is not supported "
                             "(the adapter would replace whole modules, not add a low-rank update)")
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if not is_int(r) or r <= 0 or not is_number(alpha):
            raise ValueError(f"{where}: needs a positive integer 'r' and a finite number 'lora_alpha', "
                             f"got r={r!r}, lora_alpha={alpha!r}")
        # rsLoRA scales by alpha / sqrt(r) instead of alpha / r.
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

        weights = directory / "adapter_model.safetensors"
        if not weights.is_file() and any(directory.glob("adapter_model.bin")):
            raise ValueError(f"{directory} holds only adapter_model.bin (pickle); it is not read, "
                             "for safety. Save the adapter as safetensors first")
        factors: dict[str, dict[str, TensorInfo]] = {}
        for name, info in read_header(weights).items():
            module, kind = _split(name, weights)
            if kind in factors.get(module, {}):
                raise ValueError(f"{weights}: module {module!r} has two {kind} tensors, "
                                 f"{factors[module][kind].name!r} and {name!r}")
            factors.setdefault(module, {})[kind] = info

        self.pairs: dict[str, LoraPair] = {}
        modules: dict[str, str] = {}  # af3 weight name -> the adapter module that updates it
        for module, ab in factors.items():
            if set(ab) != {"lora_A", "lora_B"}:
                raise ValueError(f"{weights}: module {module!r} has {sorted(ab)} but needs both "
                                 "lora_A and lora_B")
            a, b = ab["lora_A"], ab["lora_B"]
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r:
                raise ValueError(f"{weights}: module {module!r}: lora_A {list(a.shape)} and lora_B "
                                 f"{list(b.shape)} do not fit rank r={r}")
            try:
                target = to_af3(_hf_module_name(module) + ".weight")
            except ValueError as e:
                raise ValueError(f"{weights}: module {module!r} is not a weight of AudioFlamingo3, so "
                                 f"this adapter is not for this model ({e})") from None
            if target in modules:
                raise ValueError(f"{weights}: modules {modules[target]!r} and {module!r} both update "
                                 f"{target}")
            modules[target] = module
            self.pairs[target] = LoraPair(a, b, scale)
        if not self.pairs:
            raise ValueError(f"{weights}: no LoRA tensors found")

    def delta(self, name: str) -> torch.Tensor | None:
        """scale * B @ A (scale alpha / r, or alpha / sqrt(r) with rsLoRA) for the weight `name`
        (af3 name) in float32, or None if untouched."""
        pair = self.pairs.get(name)
        if pair is None:
            return None
        with open(pair.a.path, "rb") as f:
            a = read_tensor(f, pair.a).float()
            b = read_tensor(f, pair.b).float()
        return (b @ a) * pair.scale  # (out, r) @ (r, in) -> (out, in)


def _split(name: str, where: Path) -> tuple[str, str]:
    """'base_model.model.X.lora_A.weight' -> ('X', 'lora_A')."""
    body = name.removeprefix(_PREFIX)
    for kind in ("lora_A", "lora_B"):
        for suffix in (f".{kind}.weight", f".{kind}.default.weight"):
            if body.endswith(suffix):
                return body[: -len(suffix)], kind
    raise ValueError(f"{where}: tensor {name!r} is not a LoRA factor (…lora_A.weight / "
                     "…lora_B.weight); biases and other adapter tensors are not supported")


def _hf_module_name(module: str) -> str:
    for nvidia, hf in _NVIDIA_PREFIXES:
        if module.startswith(nvidia):
            return hf + module[len(nvidia):]
    if module.startswith(("model.layers.", "model.embed_tokens")):
        return "language_model." + module  # a bare Qwen2ForCausalLM
    return module
