"""Transcribe audio files with an af3 checkpoint: one line per file, in the order given.

    python examples/transcribe.py speech.wav other.flac --checkpoint af3-checkpoint
    python examples/transcribe.py *.wav --checkpoint af3-checkpoint --json --batch-size 4

Lines are `path<TAB>text` (newlines and tabs in the text become spaces), or with --json one
JSON object per line, {"path": ..., "text": ...}. With a single file the text is streamed as
it is generated. A file that cannot be read or transcribed gets an error line on stderr; the
others are still transcribed, and the exit code is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run from a clone without installing: make the repository importable. torch loads after --help.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples._common import (
    DEVICE_HELP,
    DTYPE_HELP,
    DTYPE_NAMES,
    as_flags,
    device_and_dtype,
    print_error,
)

FLAGS = ("--max-new-tokens", "--batch-size", "--seed", "--dtype", "--device")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, mp3) or http(s) URLs")
    p.add_argument("--checkpoint", required=True, help="af3 checkpoint directory (made by weights_convert)")
    p.add_argument("--prompt", default=None, help='instruction (default: "Transcribe the input speech.")')
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help=DTYPE_HELP)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's setting")
    p.add_argument("--batch-size", type=int, default=4, help="files transcribed together (default 4)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the checkpoint's sampling")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of path<TAB>text")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    import af3

    device, dtype = device_and_dtype(args.device, args.dtype)
    try:
        model = af3.load(args.checkpoint, device=device, dtype=dtype)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        print_error(f"cannot load checkpoint {args.checkpoint}: {e}", FLAGS)
        return 2

    gen: dict = {}
    if args.max_new_tokens is not None:
        gen["max_new_tokens"] = args.max_new_tokens
    if args.greedy:
        gen["do_sample"] = False
    if args.seed is not None:
        gen["seed"] = args.seed

    # Files are decoded a batch at a time (memory holds one batch of audio, however many files
    # are named); one that cannot be read costs only its own line.
    failed = 0
    stream = len(args.audio) == 1 and not args.json
    for start in range(0, len(args.audio), args.batch_size):
        paths, clips = [], []
        for path in args.audio[start:start + args.batch_size]:
            try:
                clips.append(load_audio(path))
            except (OSError, ValueError, TypeError, RuntimeError) as e:
                print(error_line(path, e), file=sys.stderr)
                failed += 1
            else:
                paths.append(path)
        if not clips:
            continue
        for path, text, error in transcribe_batch(model, paths, clips, args.prompt, gen, stream):
            if error is not None:
                print(error_line(path, error), file=sys.stderr)
                failed += 1
            elif not stream:
                print(format_line(path, text, args.json), flush=True)
    return 1 if failed else 0


def transcribe_batch(model, paths: list[str], clips: list, prompt: str | None, gen: dict,
                     stream: bool):
    """Yield (path, text, error) per file; a failing batch is retried file by file to find the culprit."""
    if stream:
        started = []  # the line starts with the first piece: a file that fails first prints nothing on stdout

        def piece(text: str) -> None:
            if not started:
                print(f"{paths[0]}\t", end="")
                started.append(True)
            _print_piece(text)

        try:
            text = model.transcribe(clips[0], prompt, stream=piece, **gen)
        except (ValueError, TypeError, RuntimeError) as e:
            if started:
                print(flush=True)  # end the partial line; the error goes to stderr
            yield paths[0], None, e
            return
        if not started:
            print(f"{paths[0]}\t", end="")
        print(flush=True)
        yield paths[0], text, None
        return
    try:
        texts = model.transcribe(clips, prompt, batch_size=len(clips), **gen)
    except (ValueError, TypeError, RuntimeError) as e:
        if len(clips) == 1:
            yield paths[0], None, e
            return
        for path, clip in zip(paths, clips):
            yield from transcribe_batch(model, [path], [clip], prompt, gen, False)
        return
    for path, text in zip(paths, texts):
        yield path, text, None


def load_audio(path: str):
    """af3.audio.load_audio, imported on first use (so that --help does not load torch)."""
    from af3.audio import load_audio as load

    return load(path)


def error_line(path: str, error: BaseException) -> str:
    """`error: <path>: <what>`, the path named once even when the message already names it."""
    text = as_flags(str(error), FLAGS)
    return f"error: {text}" if path in text else f"error: {path}: {text}"


def _print_piece(piece: str) -> None:
    print(piece.replace("\n", " ").replace("\t", " "), end="", flush=True)


def format_line(path: str, text: str, as_json: bool) -> str:
    if as_json:
        return json.dumps({"path": path, "text": text}, ensure_ascii=False)
    return f"{path}\t{text.replace(chr(10), ' ').replace(chr(9), ' ')}"


if __name__ == "__main__":
    sys.exit(main())
