"""Chat about one audio file, turn after turn; the audio is encoded once, on the first turn.

    python examples/chat.py speech.wav --checkpoint af3-checkpoint
    you> What is said?
    af3> ...
    you> Who says it?            (an empty line or Ctrl-D ends the chat)

The conversation's KV cache is kept between turns (af3.bundle.ChatSession), so each turn
runs only its new tokens. Questions can also be piped in, one per line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run from a clone without installing: make the repository importable. torch loads after --help.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples._common import (
    COMPILE_HELP,
    DEVICE_HELP,
    DTYPE_HELP,
    DTYPE_NAMES,
    device_and_dtype,
    print_error,
    seed,
)

END_HINT = "(an empty line or Ctrl-D ends the chat)"
FLAGS = ("--max-new-tokens", "--max-tokens", "--seed", "--dtype", "--device")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " " + END_HINT)
    p.add_argument("audio", help="the audio file (or http(s) URL) to talk about")
    p.add_argument("--checkpoint", required=True, help="af3 checkpoint directory")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help=DTYPE_HELP)
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="quantize the decoder's linear weights while loading a float checkpoint "
                        "(a checkpoint converted with --quantize needs no flag)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--max-new-tokens", type=int, default=None, help="per reply (default: the checkpoint's)")
    p.add_argument("--think", action="store_true", help="ask the model to reason before answering")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=seed, default=None, help="seed for sampling (the same replies to the same questions)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens the whole chat may hold (default: the model's context); the cache grows as needed")
    args = p.parse_args(argv)
    for option, value in (("--max-new-tokens", args.max_new_tokens), ("--max-tokens", args.max_tokens)):
        if value is not None and value < 1:
            p.error(f"{option} must be >= 1, got {value}")
    try:
        return chat(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def chat(args: argparse.Namespace) -> int:
    import torch

    import af3
    from af3.audio import load_audio

    device, dtype = device_and_dtype(args.device, args.dtype)
    try:
        clip = load_audio(args.audio)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        text = str(e)
        print_error(text if args.audio in text else f"{args.audio}: {text}")
        return 1
    try:
        model = af3.load(args.checkpoint, device=device, dtype=dtype, quantize=args.quantize,
                         compile=args.compile)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        print_error(f"cannot load checkpoint {args.checkpoint}: {e}", FLAGS)
        return 2
    gen: dict = {}
    if args.max_new_tokens is not None:
        gen["max_new_tokens"] = args.max_new_tokens
    if args.greedy:
        gen["do_sample"] = False
    if args.seed is not None:
        gen["generator"] = torch.Generator(device=device).manual_seed(args.seed)  # one stream for the chat

    try:
        session = model.start_chat(clip, max_tokens=args.max_tokens)
    except (ValueError, TypeError, RuntimeError) as e:
        print_error(str(e).replace("the audio: ", f"{args.audio}: ", 1), FLAGS)  # the clip was read here
        return 1
    interactive = sys.stdin.isatty()
    if interactive:
        print(END_HINT, file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            if interactive and not line:
                print(flush=True)  # Ctrl-D: end the "you> " line before the shell prompt
            return 0
        print("af3> ", end="", flush=True)
        try:
            session.ask(line.strip(), think=args.think, stream=lambda s: print(s, end="", flush=True), **gen)
        except ValueError as e:  # e.g. the chat outgrew its cache: say so, keep what was said
            print(flush=True)
            print_error(str(e), FLAGS)
            return 1
        print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
