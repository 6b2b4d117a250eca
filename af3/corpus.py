"""Whole corpora: a manifest of recordings, transcribed in length-sorted batches, resumably, on one process or many.

    manifest ─ lengths from headers ─ shares by length (one per rank) ─ longest first, in batches
      ─ each rank appends records to OUTPUT.part<rank> as they finish ─ rank 0 merges them into OUTPUT

A manifest holds one path per line, or JSON lines {"audio": path, "prompt": ..., "id": ...}
(prompt and id optional; other keys are ignored). The output holds one JSON record per
manifest line, in manifest order:
    {"index": 0, "id": ..., "audio": ..., "text": ..., "segments": [{"start": ..., "end": ..., "text": ...}]}
or, for a recording that failed, {"index": ..., "id": ..., "audio": ..., "error": "AudioError: ..."};
"prompt" too when the manifest line has one, and "id" is the audio path when it has none.
Records are appended and flushed as each recording finishes, so a killed run loses only the
recordings in flight; a rerun reads what is there, skips what succeeded and retries what failed.
Under torchrun every rank takes a share of the clips balanced by total duration (torch.distributed:
gloo on CPU, nccl on CUDA) and rank 0 merges the parts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist

from af3.config import is_int
from af3.jsonfile import check_utf8, parse_json
from af3.longform import (
    CHUNK_SECONDS,
    MARGIN_SECONDS,
    Recording,
    chunk_sizes,
    join_text,
    known_seconds,
    transcribe_recordings,
)
from af3.progress import ChunkProgress

# A rank that finishes its share early waits at a barrier for the others.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


@dataclasses.dataclass(frozen=True)
class Item:
    """One manifest entry; `index` is its position among the manifest's entries (blank lines skipped)."""

    index: int
    audio: str
    prompt: str | None = None
    id: str | None = None


def read_manifest(path: str | os.PathLike) -> list[Item]:
    """Entries of a manifest: lines holding a path, or JSON objects with `audio` (and `prompt`, `id`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    check_utf8(path)
    items: list[Item] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if not line.startswith("{"):
                items.append(Item(len(items), line))
                continue
            where = f"{path}, line {lineno}"
            entry = parse_json(line, where)
            if not isinstance(entry, dict) or not isinstance(entry.get("audio"), str) or not entry["audio"]:
                raise ValueError(f"{where}: a JSON line needs \"audio\": a path (and may have \"prompt\", \"id\")")
            prompt, id_ = entry.get("prompt"), entry.get("id")
            if prompt is not None and not isinstance(prompt, str):
                raise ValueError(f"{where}: \"prompt\" must be a string, got {type(prompt).__name__}")
            if id_ is not None and not (isinstance(id_, str) or is_int(id_)):
                raise ValueError(f"{where}: \"id\" must be a string or an integer, got {type(id_).__name__}")
            items.append(Item(len(items), entry["audio"], prompt, None if id_ is None else str(id_)))
    if not items:
        raise ValueError(f"{path}: the manifest lists no audio")
    return items


def shares(seconds: Sequence[float], n: int) -> list[list[int]]:
    """Split items of the given lengths into `n` shares of about equal total length (indices, ascending).

    Longest first, each to the share with the least so far (ties: the lower share): every share
    is within one item's length of the others'.
    """
    totals = [0.0] * n
    out: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(seconds)), key=lambda i: (-seconds[i], i)):
        r = min(range(n), key=lambda r: (totals[r], r))
        totals[r] += seconds[i]
        out[r].append(i)
    return [sorted(s) for s in out]


def part_path(output: Path, rank: int) -> Path:
    """Where rank `rank` appends its records before rank 0 merges them into `output`."""
    return output.with_name(f"{output.name}.part{rank}")


def read_records(output: Path, items: Sequence[Item]) -> dict[int, dict]:
    """Records already written (the output of an earlier run, and every part file), by manifest index.

    A success beats a failure. The output is rewritten from these when the run ends, so it must
    hold this manifest's results only: any other line (another file, another manifest's results,
    this one's before lines were inserted) is a ValueError, and the file is left as it is. In a
    part file (af3's own) a half-written line from a killed run, or a record of another
    manifest, is skipped.
    """
    found: dict[int, dict] = {}
    paths = [output] if output.exists() else []
    paths += sorted(output.parent.glob(f"{output.name}.part*"))
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    record = parse_json(line, f"{path}, line {lineno}")
                except ValueError:
                    if path == output:
                        raise ValueError(f"{output}, line {lineno}: not a JSON record; --output names an existing "
                                         "file that is not af3's results; choose another name") from None
                    continue  # the half line a killed rank left
                index = record.get("index") if isinstance(record, dict) else None
                if not is_int(index) or not 0 <= index < len(items) or record.get("audio") != items[index].audio:
                    if path == output:
                        raise ValueError(f"{output}, line {lineno}: not a result of this manifest's entry "
                                         f"{index if is_int(index) else '?'}; --output names an existing file that "
                                         "holds other results (or the manifest changed); choose another name")
                    continue
                if "error" not in record or "error" in found.get(index, {"error": ""}):
                    found[index] = record
    return found


def transcribe_corpus(bundle: Any, manifest: str | os.PathLike, output: str | os.PathLike, *,
                      batch_size: int = 8, sort: bool = True, chunk_seconds: float = CHUNK_SECONDS,
                      margin_seconds: float = MARGIN_SECONDS, progress: bool | None = None,
                      log: TextIO | None = None, after_record: Callable[[dict], Any] | None = None,
                      **gen: Any) -> int:
    """Transcribe every recording in `manifest` into `output` (JSON lines, manifest order); -> failures.

    Resumes: what `output` and its parts already hold successfully is skipped. Under
    torch.distributed (initialised by the caller, e.g. with `init_distributed`) every rank calls
    this; each takes its share, rank 0 merges and returns the number of failed recordings (the
    other ranks return 0). Recordings run longest first, and their chunks are batched by length
    (`transcribe_recordings`' pool); `sort=False` batches in manifest order instead.
    `after_record(record)` is called after each record is written (progress, tests).
    """
    log = sys.stderr if log is None else log
    output = Path(output)
    bundle.check_generation(**gen)  # bad settings fail here, not once per recording
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    chunk_sizes(chunk_seconds, margin_seconds)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    items = read_manifest(manifest)
    if output.resolve() == Path(manifest).resolve():
        raise ValueError(f"--output {output} is the manifest itself; name another file")
    if output.is_dir():
        raise IsADirectoryError(f"output {output} is a folder; name a file for the results")
    if not output.parent.is_dir():
        missing = not output.parent.exists()
        raise (FileNotFoundError if missing else NotADirectoryError)(
            f"output {output}: {output.parent} {'does not exist' if missing else 'is not a folder'}")

    plan: list[Any] = [None]
    if rank == 0:  # one reading of the disk, shared, so every rank splits the same work
        done = read_records(output, items)
        todo = [it for it in items if it.index not in done or "error" in done[it.index]]
        seconds = [_seconds_or_none(it.audio) for it in todo]
        weights = [chunk_seconds if s is None else s for s in seconds]
        plan = [([[(todo[i], seconds[i]) for i in share] for share in shares(weights, world)], len(items) - len(todo))]
    if world > 1:
        dist.broadcast_object_list(plan, src=0)
    split, n_done = plan[0]
    mine = split[rank]
    total = sum(s or 0.0 for _, s in mine)
    # One write, newline included: under PYTHONUNBUFFERED, print writes the newline apart, and another
    # rank's line sharing the stream could land between the two.
    log.write(f"rank {rank}/{world}: {len(mine)} to do, {total:.0f} s of audio ({n_done} of {len(items)} done "
              "before)\n")
    log.flush()
    if sort:
        mine = sorted(mine, key=lambda pair: (-(pair[1] or 0.0), pair[0].index))  # longest first
    recordings = [Recording(it, it.audio, it.prompt, s) for it, s in mine]
    reporter = None
    if progress or (progress is None and log.isatty()):
        reporter = ChunkProgress(log, label=f"rank {rank}: " if world > 1 else "")
    try:
        with _appending(part_path(output, rank)) as part:
            for rec, result in transcribe_recordings(lambda c, p: bundle.transcribe_chunks(c, p, **gen), recordings,
                                                     chunk_seconds=chunk_seconds, margin_seconds=margin_seconds,
                                                     batch_size=batch_size, pool=4 if sort else 1,
                                                     progress=reporter):
                record = _record(rec.key, result)
                part.write(json.dumps(record, ensure_ascii=False) + "\n")
                part.flush()
                if after_record is not None:
                    after_record(record)
    finally:
        if reporter is not None:
            reporter.end_line()
    if world > 1:
        dist.barrier()
    if rank != 0:
        return 0
    return merge(output, items)


def merge(output: Path, items: Sequence[Item]) -> int:
    """Write `output` from itself and its parts in manifest order, atomically, and delete the parts.

    Returns the number of manifest entries that failed or are missing."""
    records = read_records(output, items)
    parts = sorted(output.parent.glob(f"{output.name}.part*"))
    tmp = output.with_name(f".{output.name}.merging")
    with open(tmp, "w", encoding="utf-8") as f:
        for item in items:
            if item.index in records:
                f.write(json.dumps(records[item.index], ensure_ascii=False) + "\n")
    os.replace(tmp, output)
    for p in parts:
        p.unlink()
    return sum(1 for it in items if it.index not in records or "error" in records[it.index])


def init_distributed(device: str | torch.device | None = None,
                     timeout: datetime.timedelta | None = BARRIER_TIMEOUT) -> torch.device | None:
    """Join the torch.distributed group torchrun describes and return this rank's device; None
    when not launched by torchrun (or with one process). `device`: the user's choice; None means
    this rank's GPU (LOCAL_RANK) where there are GPUs, else the CPU. nccl on CUDA, gloo on the CPU.
    `timeout`: how long a collective may wait (a corpus's ranks wait for each other's shares at
    the end; None: torch's default, for work that meets at every step, such as training)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    # Before the group exists: torch (2.14) keeps a group alive past destroy_process_group when
    # torch._dynamo is first imported after the group was made (building a model on the meta
    # device imports it), and gloo's threads then outlive the script and can abort its exit as
    # they free the last collectives' tensors ("terminate called without an active exception",
    # 1 in 30-45 two-process fine-tuning runs). Imported first, the group is destroyed as it should be.
    import torch._dynamo
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local)
        n = torch.cuda.device_count()
        if device.index >= n:
            raise ValueError(f"local rank {local} would run on {device}, but this node has {n} GPU(s): start "
                             f"one process per GPU (torchrun --nproc-per-node {n}), or run on the CPUs "
                             "(--device cpu)")
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return device


def _seconds_or_none(audio: str) -> float | None:
    try:
        return known_seconds(audio)
    except (OSError, ValueError, TypeError, RuntimeError):
        return None  # it fails again when it is transcribed, and is recorded then


def _record(item: Item, result: Any) -> dict:
    record: dict[str, Any] = {"index": item.index, "id": item.id if item.id is not None else item.audio,
                              "audio": item.audio}
    if item.prompt is not None:
        record["prompt"] = item.prompt
    if isinstance(result, BaseException):
        record["error"] = f"{type(result).__name__}: {result}"
    else:
        record["text"] = join_text(result)
        record["segments"] = [s.to_dict() for s in result]
    return record


@contextlib.contextmanager
def _appending(path: Path) -> Iterator[TextIO]:
    """Append to a part file, first ending a half-written line that a killed run may have left."""
    ragged = False
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            ragged = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        if ragged:
            f.write("\n")
        yield f
