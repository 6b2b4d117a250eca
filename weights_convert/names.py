"""The one name map from HF's AudioFlamingo3 tensor names to af3's.

Both HF spellings are accepted:
  old (transformers 4.x):  audio_tower.…, multi_modal_projector.…, language_model.model.…,
                           language_model.lm_head.weight
  new (transformers 5.x):  model.audio_tower.…, model.multi_modal_projector.…,
                           model.language_model.…, lm_head.weight
A name that matches no rule raises UnknownTensorError naming it: nothing is silently dropped.
`af3_to_hf` runs the same tables backwards (new spelling), for files HF must read (LoRA adapters).
"""

from __future__ import annotations

import re


class UnknownTensorError(ValueError):
    """A checkpoint tensor name that no rule of the map covers."""


# Whisper encoder layer: HF module path -> ours (suffix .weight / .bias is kept as is).
_ENCODER_LAYER = {
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",  # weight only: Whisper's k_proj has no bias
    "self_attn.v_proj": "attn.v",
    "self_attn.out_proj": "attn.o",
    "self_attn_layer_norm": "attn_norm",
    "final_layer_norm": "mlp_norm",
    "fc1": "fc1",
    "fc2": "fc2",
}
_ENCODER_TOP = {
    "conv1": "conv1",
    "conv2": "conv2",
    "embed_positions": "embed_positions",
    "layer_norm": "norm",
}
_PROJECTOR = {"linear_1": "linear1", "linear_2": "linear2"}
# Qwen2 decoder layer.
_DECODER_LAYER = {
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o",  # weight only: Qwen2's o_proj has no bias
    "mlp.gate_proj": "mlp.gate",
    "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
}
_DECODER_TOP = {"embed_tokens": "embed_tokens", "norm": "norm"}

# Which parameter suffixes each of our module kinds may carry (catches e.g. a k bias in Whisper).
_ALLOWED_SUFFIXES = {
    "encoder.attn.k": ("weight",),
    "encoder.embed_positions": ("weight",),
    "decoder.attn.o": ("weight",),
    "decoder.mlp.gate": ("weight",),
    "decoder.mlp.up": ("weight",),
    "decoder.mlp.down": ("weight",),
    "decoder.attn_norm": ("weight",),
    "decoder.mlp_norm": ("weight",),
    "decoder.embed_tokens": ("weight",),
    "decoder.norm": ("weight",),
}

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def _strip_prefix(name: str) -> tuple[str, str] | None:
    """Split off the tower prefix: ('audio' | 'projector' | 'text' | 'lm_head', rest)."""
    for prefix, part in (
        ("model.audio_tower.", "audio"),
        ("audio_tower.", "audio"),
        ("model.multi_modal_projector.", "projector"),
        ("multi_modal_projector.", "projector"),
        ("model.language_model.", "text"),
        ("language_model.model.", "text"),
    ):
        if name.startswith(prefix):
            return part, name[len(prefix):]
    if name in ("lm_head.weight", "language_model.lm_head.weight"):
        return "lm_head", "weight"
    return None


def _module_and_suffix(rest: str) -> tuple[str, str] | None:
    module, dot, suffix = rest.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    return module, suffix


def _map_tower(rest: str, top: dict[str, str], layer: dict[str, str], tower: str) -> str | None:
    split = _module_and_suffix(rest)
    if split is None:
        return None
    module, suffix = split
    m = _LAYER.fullmatch(module)
    if m:
        ours = layer.get(m.group(2))
        prefix = f"{tower}.layers.{m.group(1)}."
    else:
        ours = top.get(module)
        prefix = f"{tower}."
    if ours is None:
        return None
    if suffix not in _ALLOWED_SUFFIXES.get(f"{tower}.{ours}", ("weight", "bias")):
        return None
    return f"{prefix}{ours}.{suffix}"


def hf_to_af3(name: str) -> str:
    """Map one HF tensor name to af3's state-dict name; UnknownTensorError if no rule covers it."""
    if not isinstance(name, str):
        raise TypeError(f"tensor name must be a str, got {type(name).__name__}")
    split = _strip_prefix(name)
    out = None
    if split is not None:
        part, rest = split
        if part == "audio":
            out = _map_tower(rest, _ENCODER_TOP, _ENCODER_LAYER, "encoder")
        elif part == "text":
            out = _map_tower(rest, _DECODER_TOP, _DECODER_LAYER, "decoder")
        elif part == "projector":
            mapped = _module_and_suffix(rest)
            if mapped is not None and mapped[0] in _PROJECTOR:
                out = f"projector.{_PROJECTOR[mapped[0]]}.{mapped[1]}"
        else:
            out = "decoder.lm_head.weight"
    if out is None:
        raise UnknownTensorError(f"tensor {name!r} is not part of an AudioFlamingo3 checkpoint "
                                 "(no rule in weights_convert/names.py maps it)")
    return out


def af3_to_hf(name: str) -> str:
    """Map one af3 state-dict name (or module name, without .weight/.bias) to HF's new-style name.

    The inverse of `hf_to_af3` for transformers 5.x spelling; UnknownTensorError if no rule covers it.
    """
    if not isinstance(name, str):
        raise TypeError(f"tensor name must be a str, got {type(name).__name__}")
    tower, _, rest = name.partition(".")
    out = None
    if name in ("decoder.lm_head", "decoder.lm_head.weight"):
        out = "lm_head" + name[len("decoder.lm_head"):]
    elif tower in ("encoder", "decoder") and rest:
        prefix = "model.audio_tower." if tower == "encoder" else "model.language_model."
        top, layer = (_ENCODER_TOP, _ENCODER_LAYER) if tower == "encoder" else (_DECODER_TOP, _DECODER_LAYER)
        out = _unmap(rest, top, layer, prefix)
    elif tower == "projector":
        module, dot, suffix = rest.partition(".")
        back = {ours: hf for hf, ours in _PROJECTOR.items()}
        if module in back and (not dot or suffix in ("weight", "bias")):
            out = f"model.multi_modal_projector.{back[module]}{dot}{suffix}"
    # The forward map is the contract: the answer must map back (this also applies _ALLOWED_SUFFIXES).
    tensor = name if name.endswith((".weight", ".bias")) else name + ".weight"
    try:
        ok = out is not None and hf_to_af3(out if tensor == name else out + ".weight") == tensor
    except UnknownTensorError:
        ok = False
    if not ok:
        raise UnknownTensorError(f"{name!r} is not an af3 AudioFlamingo3 tensor or module name "
                                 "(no rule in weights_convert/names.py maps it)")
    return out


def _unmap(rest: str, top: dict[str, str], layer: dict[str, str], prefix: str) -> str | None:
    """'layers.3.attn.q.weight' -> prefix + 'layers.3.self_attn.q_proj.weight' (suffix optional)."""
    module, suffix = rest, ""
    split = _module_and_suffix(rest)
    if split is not None:
        module, suffix = split[0], "." + split[1]
    m = _LAYER.fullmatch(module)
    table, body, head = (layer, m.group(2), f"layers.{m.group(1)}.") if m else (top, module, "")
    back = {ours: hf for hf, ours in table.items()}
    return None if body not in back else f"{prefix}{head}{back[body]}{suffix}"
