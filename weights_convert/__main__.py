"""`python -m weights_convert SRC DST [options]`: an HF or NVIDIA AF3 checkpoint -> af3's layout."""

from __future__ import annotations

import argparse
import re
import sys
import time

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000; '256MiB' -> 268_435_456; a bare number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2GB, 500MB or 256MiB")
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return n


class _Progress:
    """Tensors and bytes done: one self-rewriting line on a terminal, a line per 10% otherwise."""

    def __init__(self, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self.last = 0.0
        self.next_tenth = 1

    def __call__(self, n_done: int, n_total: int, bytes_done: int, bytes_total: int) -> None:
        finished = n_done == n_total
        if self.tty:
            now = time.monotonic()
            if not finished and now - self.last < 0.2:
                return
            self.last = now
        else:
            tenth = 10 * bytes_done // max(bytes_total, 1)
            if not finished and tenth < self.next_tenth:
                return
            self.next_tenth = tenth + 1
        line = (f"{n_done}/{n_total} tensors, {_size(bytes_done)} of {_size(bytes_total)} "
                f"({100 * bytes_done / max(bytes_total, 1):.0f}%)")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if finished else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m weights_convert",
        description="Convert an Audio Flamingo 3 checkpoint (HF layout, either tensor-name style, "
                    "or NVIDIA's llm/ sound_tower/ sound_mm_projector/ layout) into af3's layout.")
    p.add_argument("src", help="source checkpoint directory")
    p.add_argument("dst", help="destination directory (created; must not exist unless --force)")
    p.add_argument("--dtype", choices=["keep", "bf16", "fp16", "fp32"], default="keep",
                   help="dtype of the written floating-point tensors (default: keep)")
    p.add_argument("--adapter", metavar="DIR", help="merge this PEFT LoRA adapter "
                   "(adapter_config.json + adapter_model.safetensors), e.g. the thinking-mode one")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("2GB"), metavar="SIZE",
                   help="largest output file, e.g. 2GB (default), 500MB, 256MiB")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress, only the summary")
    args = p.parse_args(argv)

    # Imported here so that --help does not pay for torch.
    from weights_convert.convert import convert

    try:
        summary = convert(args.src, args.dst, dtype=args.dtype, adapter=args.adapter,
                          max_shard_size=args.max_shard_size, force=args.force,
                          progress=None if args.quiet else _Progress())
    except (ValueError, TypeError, OSError) as e:  # OSError covers FileNotFoundError
        print(f"weights_convert: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("weights_convert: interrupted; nothing was written to the destination", file=sys.stderr)
        return 130
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
