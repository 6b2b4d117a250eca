"""Transcribe audio files, of any length, or a whole corpus, with an af3 checkpoint.

    python examples/transcribe.py speech.wav other.flac --checkpoint af3-checkpoint
    python examples/transcribe.py meeting.flac --checkpoint af3-checkpoint --format srt > meeting.srt
    python examples/transcribe.py --manifest clips.txt --output results.jsonl --checkpoint af3-checkpoint
    torchrun --nproc-per-node 2 examples/transcribe.py --manifest clips.txt --output results.jsonl ...

Recordings longer than --chunk-seconds (default 30) are cut into chunks at quiet points and
transcribed a batch of chunks at a time (af3/longform.py). Formats for files: txt (default),
`path<TAB>text` per file (newlines and tabs in the text become spaces); jsonl, one object per
file {"path", "text", "segments"}; srt and vtt, subtitles of one file whose cue times are the
chunks' (AF3 gives no word timings). A single short file is streamed as it is generated.

With --manifest (one path per line, or JSON lines {"audio", "prompt", "id"}) results go to
--output as JSON lines in manifest order, appended as they finish: a rerun skips what is done
(af3/corpus.py). Under torchrun each rank takes a share balanced by duration and rank 0 merges.

Exit status: the number of recordings that failed (100 for 100 or more; each gets an error line
on stderr, or an error record in --output); 101 when nothing could run (checkpoint, manifest).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run from a clone without installing: make the repository importable. torch loads after --help.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples._common import (
    COMPILE_HELP,
    DEVICE_HELP,
    DTYPE_HELP,
    DTYPE_NAMES,
    as_flags,
    device_and_dtype,
    print_error,
    seed,
)

FLAGS = ("--max-new-tokens", "--batch-size", "--seed", "--dtype", "--device", "--chunk-seconds", "--margin-seconds")
FORMATS = ("txt", "jsonl", "srt", "vtt")
MAX_EXIT_FAILED = 100  # exit statuses above ~125 mean signals to a shell
CANNOT_START = 101
MAX_CHUNK_SECONDS = 600  # af3.longform.MAX_CHUNK_SECONDS, restated so that --help needs no torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("audio", nargs="*", help="audio files (wav, flac, ogg, mp3) or http(s) URLs")
    p.add_argument("--checkpoint", required=True, help="af3 checkpoint directory (made by weights_convert)")
    p.add_argument("--manifest", default=None, help="a corpus: one path per line, or JSON lines with "
                   '"audio" and optional "prompt", "id" (needs --output)')
    p.add_argument("--output", default=None, help="with --manifest: the results file (JSON lines), resumed if it exists")
    p.add_argument("--format", choices=FORMATS, default=None, help="output format for files (default txt; "
                   "srt and vtt take one file); a manifest's output is always jsonl")
    p.add_argument("--json", action="store_true", help="the same as --format jsonl")
    p.add_argument("--prompt", default=None, help='instruction (default: "Transcribe the input speech.")')
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help=DTYPE_HELP)
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="quantize the decoder's linear weights while loading a float checkpoint "
                        "(a checkpoint converted with --quantize needs no flag)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--max-new-tokens", type=int, default=None, help="per chunk (default: the checkpoint's setting)")
    p.add_argument("--batch-size", type=int, default=8, help="chunks transcribed together (default 8)")
    p.add_argument("--chunk-seconds", type=float, default=30.0, help="longest chunk, at most 600 (default 30)")
    p.add_argument("--margin-seconds", type=float, default=2.0,
                   help="how far before a chunk boundary a cut may move to a quiet point (default 2)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the checkpoint's sampling")
    p.add_argument("--seed", type=seed, default=None, help="seed for sampling (reproducible output)")
    args = p.parse_args(argv)
    if args.json:
        if args.format not in (None, "jsonl"):
            p.error(f"--json and --format {args.format} disagree; give one of them")
        args.format = "jsonl"
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 < args.chunk_seconds <= MAX_CHUNK_SECONDS:
        p.error(f"--chunk-seconds must be in (0, {MAX_CHUNK_SECONDS}] (AF3 hears at most 10 minutes), "
                f"got {args.chunk_seconds:g}")
    if not 0 <= args.margin_seconds < args.chunk_seconds:
        p.error(f"--margin-seconds must be >= 0 and below --chunk-seconds, got {args.margin_seconds:g}")
    if args.manifest is not None:
        if args.audio:
            p.error("give audio files or --manifest, not both")
        if args.output is None:
            p.error("--manifest needs --output (the results file, JSON lines)")
        if args.format not in (None, "jsonl"):
            p.error(f"--format {args.format}: a manifest's results are JSON lines (--format jsonl)")
    else:
        if not args.audio:
            p.error("give audio files, or --manifest FILE --output FILE")
        if args.output is not None:
            p.error("--output goes with --manifest; for files, redirect the standard output")
        if args.format in ("srt", "vtt") and len(args.audio) != 1:
            p.error(f"--format {args.format} takes one audio file, got {len(args.audio)}")
    args.format = args.format or ("jsonl" if args.manifest else "txt")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before torch is imported, so --help and usage errors are quick
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    import torch

    import af3
    from af3.corpus import init_distributed
    from af3.longform import chunk_sizes

    try:  # the library's own rule for a chunk too short to give a token, before anything loads
        chunk_sizes(args.chunk_seconds, args.margin_seconds)
    except ValueError as e:
        print_error(str(e), FLAGS)
        return CANNOT_START
    try:
        rank_device = init_distributed(args.device)  # under torchrun: join the group; None otherwise
    except (ValueError, RuntimeError) as e:  # too few GPUs for the processes; a device torch does not know
        print_error(f"cannot start under torchrun: {e}")
        return CANNOT_START
    if rank_device is not None and args.manifest is None:
        print_error("under torchrun, give the work as --manifest FILE --output FILE")
        return CANNOT_START
    device, dtype = device_and_dtype(args.device if rank_device is None else str(rank_device), args.dtype)
    try:
        model = af3.load(args.checkpoint, device=device, dtype=dtype, quantize=args.quantize,
                         compile=args.compile)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        print_error(f"cannot load checkpoint {args.checkpoint}: {e}", FLAGS)
        return CANNOT_START

    gen: dict = {}
    if args.max_new_tokens is not None:
        gen["max_new_tokens"] = args.max_new_tokens
    if args.greedy:
        gen["do_sample"] = False
    if args.seed is not None:
        gen["seed"] = args.seed
    chunking = {"chunk_seconds": args.chunk_seconds, "margin_seconds": args.margin_seconds}
    if args.manifest is None:
        return min(run_files(model, args, chunking, gen), MAX_EXIT_FAILED)
    try:
        return run_manifest(model, args, chunking, gen)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_manifest(model, args: argparse.Namespace, chunking: dict, gen: dict) -> int:
    from af3.corpus import transcribe_corpus

    try:
        failed = transcribe_corpus(model, args.manifest, args.output, batch_size=args.batch_size,
                                   **chunking, **gen)
    except (OSError, ValueError) as e:  # the manifest or the output, before any work
        named = args.output if str(e).startswith(f"output {args.output}") else args.manifest
        print(error_line(named, e), file=sys.stderr)
        return CANNOT_START
    if failed:
        print(f"{failed} recording(s) failed; their records in {args.output} say why", file=sys.stderr)
    return min(failed, MAX_EXIT_FAILED)


def run_files(model, args: argparse.Namespace, chunking: dict, gen: dict) -> int:
    """Transcribe the named files; print each as it finishes, in the order given; -> failures."""
    from af3.longform import (
        Recording,
        format_srt,
        format_vtt,
        join_text,
        known_seconds,
        transcribe_recordings,
    )
    from af3.progress import ChunkProgress

    failed = 0
    recordings = []
    for path in args.audio:
        try:
            recordings.append(Recording(path, path, args.prompt, known_seconds(path)))
        except (OSError, ValueError, TypeError, RuntimeError) as e:  # missing or undecodable: fails alone
            print(error_line(path, e), file=sys.stderr)
            failed += 1
    if not recordings:
        return failed
    short = recordings[0].seconds is not None and recordings[0].seconds <= args.chunk_seconds
    if len(args.audio) == 1 and args.format == "txt" and short:  # one chunk: show the text as it comes
        return stream_one(model, args.audio[0], args.prompt, chunking, gen)

    reporter = ChunkProgress() if sys.stderr.isatty() else None
    results = transcribe_recordings(lambda clips, prompts: model.transcribe_chunks(clips, prompts, **gen),
                                    recordings, batch_size=args.batch_size, pool=1, progress=reporter, **chunking)
    for rec, result in results:
        if reporter is not None:
            reporter.end_line()
        if isinstance(result, BaseException):
            print(error_line(rec.key, result), file=sys.stderr)
            failed += 1
        elif args.format == "srt":
            print(format_srt(result), end="", flush=True)
        elif args.format == "vtt":
            print(format_vtt(result), end="", flush=True)
        elif args.format == "jsonl":
            row = {"path": rec.key, "text": join_text(result), "segments": [s.to_dict() for s in result]}
            print(json.dumps(row, ensure_ascii=False), flush=True)
        else:
            print(f"{rec.key}\t{_one_line(join_text(result))}", flush=True)
    return failed


def stream_one(model, path: str, prompt: str | None, chunking: dict, gen: dict) -> int:
    """Print `path<TAB>text` as the text is generated; -> failures (0 or 1)."""
    started = False  # the line starts with the first piece: a file that fails first prints nothing on stdout

    def piece(text: str) -> None:
        nonlocal started
        if not started:
            print(f"{path}\t", end="")
            started = True
        _print_piece(text)

    try:
        model.transcribe(path, prompt, stream=piece, progress=False, **chunking, **gen)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        if started:
            print(flush=True)  # end the partial line; the error goes to stderr
        print(error_line(path, e), file=sys.stderr)
        return 1
    if not started:
        print(f"{path}\t", end="")
    print(flush=True)
    return 0


def error_line(path: str, error: BaseException) -> str:
    """`error: <path>: <what>`, the path named once even when the message already names it."""
    text = as_flags(str(error), FLAGS)
    return f"error: {text}" if path in text else f"error: {path}: {text}"


def _one_line(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ")


def _print_piece(piece: str) -> None:
    print(_one_line(piece), end="", flush=True)


if __name__ == "__main__":
    sys.exit(main())
