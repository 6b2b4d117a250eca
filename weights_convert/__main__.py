"""`python -m weights_convert SRC DST [options]`: an HF or NVIDIA AF3 checkpoint -> af3's layout."""

from __future__ import annotations

import argparse
import re
import sys

DTYPE_CHOICES = ("keep", "bf16", "fp16", "fp32")  # convert.DTYPE_CHOICES, restated so that --help needs no torch
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000; '256MiB' -> 268_435_456; a bare number is bytes."""
    m = re.fullmatch(r"\s*([-+]?\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2GB, 500MB or 256MiB")
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be at least 1 byte")
    return n


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _join_values(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """'--max-shard-size -1GB' -> '--max-shard-size=-1GB': argparse would read '-1GB' as an option."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = _Parser(
        prog="python -m weights_convert",
        description="Convert an Audio Flamingo 3 checkpoint (HF layout, either tensor-name style, "
                    "or NVIDIA's llm/ sound_tower/ sound_mm_projector/ layout) into af3's layout; "
                    "an af3 checkpoint can be re-cast or quantized.")
    p.add_argument("src", help="source checkpoint directory")
    p.add_argument("dst", help="destination directory (created; must not exist unless --force)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep",
                   help="dtype of the written floating-point tensors (default: keep)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="store the decoder's linear weights and LM head as int8 (one scale per "
                        "output channel) or int4 (groups of --group-size inputs); --dtype is then "
                        "that of the parts that stay floating point")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=None, metavar="N",
                   help="int4 only: inputs sharing one scale and zero, 32, 64 or 128 (default)")
    p.add_argument("--adapter", metavar="DIR", help="merge this PEFT LoRA adapter "
                   "(adapter_config.json + adapter_model.safetensors), e.g. the thinking-mode one")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("2GB"), metavar="SIZE",
                   help="largest output file, e.g. 2GB (default), 500MB, 256MiB")
    p.add_argument("--force", action="store_true", help="replace DST if it is an earlier af3 checkpoint (or empty)")
    p.add_argument("--quiet", action="store_true", help="no progress, only the summary")
    args = p.parse_args(_join_values(sys.argv[1:] if argv is None else list(argv), ("--max-shard-size",)))
    if args.group_size is not None and args.quantize != "int4":
        p.error("--group-size is for --quantize int4")

    # Imported here so that --help does not pay for torch.
    from af3.progress import TensorProgress
    from weights_convert.convert import convert

    progress = None if args.quiet else TensorProgress()
    try:
        summary = convert(args.src, args.dst, dtype=args.dtype, adapter=args.adapter,
                          max_shard_size=args.max_shard_size, force=args.force, progress=progress,
                          quantize=args.quantize, group_size=args.group_size)
    except (ValueError, TypeError, OSError) as e:  # OSError covers FileNotFoundError
        if progress is not None:
            progress.end_line()
        print(f"weights_convert: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if progress is not None:
            progress.end_line()
        print("weights_convert: interrupted; nothing was written to the destination", file=sys.stderr)
        return 130
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
