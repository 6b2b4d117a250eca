"""What the example scripts share. Imports nothing heavy, so `--help` answers at once (torch loads later).

The scripts run from a clone without installing: they put the repository on sys.path and import
this file as `examples._common`.
"""

from __future__ import annotations

import argparse
import math
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
         "margin_seconds": "--margin-seconds",
         # finetune.TrainConfig's settings (not "steps", "train" or "seed": words of other messages too)
         "lr": "--lr", "lora_rank": "--lora-rank", "lora_alpha": "--lora-alpha", "lora_dropout": "--lora-dropout",
         "lora_targets": "--lora-targets", "grad_accum": "--grad-accum", "warmup_steps": "--warmup-steps",
         "weight_decay": "--weight-decay", "max_grad_norm": "--max-grad-norm"}


def seed(text: str) -> int:
    """argparse type for --seed: an int that torch's generators take (af3's own check; called only
    when --seed is given, so --help still imports nothing heavy)."""
    from af3.generation import check_seed

    value = int(text)  # not a number: argparse's own "invalid seed value"
    try:
        return check_seed(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def finite(text: str) -> float:
    """argparse type for a float setting: nan and inf are refused (they would train to nan weights)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


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
    What follows a JSON file's name ("generation_config.json: max_new_tokens must be >= 1") is
    about that file's keys, and stays as it is.
    """
    head, sep, tail = message.partition(".json: ")
    if sep:
        return as_flags(head, flags) + sep + tail
    for name, flag in FLAGS.items():
        if flag not in flags:
            continue
        message = re.sub(rf"\w+\({name}=\.\.\.\)", flag, message)  # start_chat(max_tokens=...)
        # Not inside a flag already written (--device): "-" is not a word character.
        message = re.sub(rf"(?<![\w-]){name}=(\S+?)([,;)]|\s|$)", rf"{flag} \1\2", message)  # max_new_tokens=256
        message = re.sub(rf"(?<![\w-]){name}\b", flag, message)
    return message


def print_error(message: str, flags: tuple[str, ...] = ()) -> None:
    print(f"error: {as_flags(message, flags)}", file=sys.stderr)
