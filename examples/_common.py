"""What the example scripts share. Imports nothing heavy, so `--help` answers at once (torch loads later).

The scripts run from a clone without installing: they put the repository on sys.path and import
this file as `examples._common`.
"""

from __future__ import annotations

import re
import sys

DTYPE_NAMES = ("bfloat16", "float16", "float32")  # af3.config.DTYPE_NAMES, restated so that --help needs no torch
DTYPE_HELP = "weights dtype (default: bfloat16 on a GPU, float32 on the CPU)"
DEVICE_HELP = "cuda, cuda:1, cpu, ... (default: cuda if available, else cpu)"
COMPILE_HELP = ("run each decoding step through torch.compile (CUDA graphs on a GPU): the first tokens wait "
                "for the compilation, later ones come 2-3x faster; the same tokens")

# A library error names the keyword of a Python call; a script's user changes a flag instead.
FLAGS = {"max_new_tokens": "--max-new-tokens", "max_tokens": "--max-tokens", "batch_size": "--batch-size",
         "dtype": "--dtype", "device": "--device", "seed": "--seed", "chunk_seconds": "--chunk-seconds",
         "margin_seconds": "--margin-seconds"}


def default_device() -> str:
    """Where the examples run without --device: cuda when available, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[str, str]:
    """The defaults the examples share: `default_device()`, bfloat16 there on a GPU and float32 on the CPU."""
    device = device or default_device()
    return device, dtype or ("bfloat16" if device.startswith("cuda") else "float32")


def as_flags(message: str, flags: tuple[str, ...]) -> str:
    """`message` with the Python keywords that are flags of this script written as those flags.

    "lower max_new_tokens" -> "lower --max-new-tokens"; "start_chat(max_tokens=...)" -> "--max-tokens".
    """
    for name, flag in FLAGS.items():
        if flag not in flags:
            continue
        message = re.sub(rf"\w+\({name}=\.\.\.\)", flag, message)  # start_chat(max_tokens=...)
        message = re.sub(rf"\b{name}=(\S+?)([,;)]|\s|$)", rf"{flag} \1\2", message)  # max_new_tokens=256
        message = re.sub(rf"\b{name}\b", flag, message)
    return message


def print_error(message: str, flags: tuple[str, ...] = ()) -> None:
    print(f"error: {as_flags(message, flags)}", file=sys.stderr)
