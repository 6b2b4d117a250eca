"""Size checks before large allocations whose size comes from a file (config.json,
generation_config.json, safetensors headers) rather than from the user's own data.

A crafted `max_position_embeddings` with a matching `max_new_tokens` would otherwise ask the
allocator for tens of gigabytes on the first `generate`, and a `num_hidden_layers` of 10^9 would
build layers on the meta device for ever before the weights are even looked at. These checks
refuse such settings with a ValueError naming the setting and the bytes it would take.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import torch

from af3.progress import format_size


def device_memory(device: torch.device | str) -> int | None:
    """Total memory of `device` in bytes (RAM for the CPU), or None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not a POSIX system
            return None
    return None


def check_fits(nbytes: int, device: torch.device | str, what: str, fix: str) -> None:
    """ValueError when `nbytes` exceed all the memory `device` has: such an allocation can never succeed."""
    total = device_memory(device)
    if total is not None and nbytes > total:
        raise ValueError(f"{what} would take {format_size(nbytes)} ({nbytes:,} bytes), more than the "
                         f"{format_size(total)} of memory on {torch.device(device)}; {fix}")


def kv_cache_bytes(text_config, batch_size: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of the keys and values of every decoder layer for `batch_size` x `max_len` positions."""
    t = text_config
    return 2 * t.num_hidden_layers * batch_size * t.num_key_value_heads * max_len * t.head_dim * dtype.itemsize


_LAYER_NAME = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.")


def check_layer_counts(config, names: Iterable[str], what: str) -> None:
    """The layer counts of `config` agree with the layers the tensor names hold (af3 names).

    Run on the names from the safetensors headers before the model is built: building
    `num_hidden_layers` layers costs time and memory even on the meta device (10^5 layers took
    156 s and 5 GB), so a count no file could back is refused first.
    """
    found: dict[str, set[int]] = {"encoder": set(), "decoder": set()}
    for name in names:
        m = _LAYER_NAME.match(name)
        if m:
            found[m.group(1)].add(int(m.group(2)))
    for tower, setting, n in (("encoder", "audio num_hidden_layers", config.audio.num_hidden_layers),
                              ("decoder", "text num_hidden_layers", config.text.num_hidden_layers)):
        layers = found[tower]
        if len(layers) != n or (layers and max(layers) != n - 1):  # not exactly 0..n-1 (never set(range(n)))
            held = f"layers 0..{max(layers)}" if layers and max(layers) == len(layers) - 1 else (
                f"{len(layers)} layer indices ({', '.join(map(str, sorted(layers)[:5]))}{', …' if len(layers) > 5 else ''})")
            raise ValueError(f"{what}: the config's {setting} is {n:,} but the weights hold {tower} {held}; "
                             "the config does not belong to these weights")
