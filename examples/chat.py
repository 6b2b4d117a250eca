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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import af3
from af3.audio import load_audio

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("audio", help="the audio file (or http(s) URL) to talk about")
    p.add_argument("--checkpoint", required=True, help="af3 checkpoint directory")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="quantize the decoder's linear weights while loading a float checkpoint "
                        "(a checkpoint converted with --quantize needs no flag)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--max-new-tokens", type=int, default=None, help="per reply (default: the checkpoint's)")
    p.add_argument("--think", action="store_true", help="ask the model to reason before answering")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--max-tokens", type=int, default=8192, help="room for the whole chat (default 8192)")
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
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    try:
        clip = load_audio(args.audio)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        text = str(e)
        print(f"error: {text}" if args.audio in text else f"error: {args.audio}: {text}", file=sys.stderr)
        return 1
    try:
        model = af3.load(args.checkpoint, device=device, dtype=dtype, quantize=args.quantize)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        print(f"error: cannot load checkpoint {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    gen: dict = {}
    if args.max_new_tokens is not None:
        gen["max_new_tokens"] = args.max_new_tokens
    if args.greedy:
        gen["do_sample"] = False

    try:
        session = model.start_chat(clip, max_tokens=args.max_tokens)
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    interactive = sys.stdin.isatty()
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
            print(f"\nerror: {e}", file=sys.stderr)
            return 1
        print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
