"""Recordings of any length: cut into chunks at quiet points, transcribed a batch of chunks at a time.

AF3 hears at most 10 minutes at once and gives no word timings. A longer recording is cut into
chunks of `chunk_seconds` (30 s by default: one encoder window), each cut moved back to the
quietest 20 ms within `margin_seconds` before the nominal boundary, so that a word is split only
where the audio has no pause. Every chunk becomes a `Segment` whose times are the chunk's.

    audio ─ iter_audio (blocks) ─ iter_chunks (quiet cuts) ─ batches of chunks ─ model ─ Segments

The audio is read block by block, so memory holds one block and one batch of chunks, however
long the recording. Segments are written as txt, SRT or WebVTT here; SRT and WebVTT are read back.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from af3.audio import AudioSource, audio_seconds, iter_audio
from af3.config import is_number
from af3.frontend import CHUNK_LENGTH, MAX_SECONDS, SAMPLING_RATE
from af3.windows import SILENT_SAMPLES

CHUNK_SECONDS = float(CHUNK_LENGTH)  # one encoder window
MAX_CHUNK_SECONDS = MAX_SECONDS  # all AF3 hears at once
MARGIN_SECONDS = 2.0  # how far before the nominal boundary a cut may move to find a pause
FRAME_SAMPLES = 320  # 20 ms: the energy window a cut is centred on
MIN_TAIL_SAMPLES = SAMPLING_RATE // 10  # a last chunk shorter than 0.1 s is padded with silence to this

BatchRunner = Callable[[list[torch.Tensor], list[str | None]], list[str]]
Progress = Callable[[int, int, float], Any]  # (chunks done, chunks expected, audio seconds done)


@dataclasses.dataclass(frozen=True)
class Segment:
    """A stretch of a recording and its text; times in seconds, to the millisecond."""

    start: float
    end: float
    text: str

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "text": self.text}


@dataclasses.dataclass(frozen=True, eq=False)
class Chunk:
    """`samples` (1-D, 16 kHz) of a recording, starting at sample `start`."""

    start: int
    samples: torch.Tensor

    @property
    def end(self) -> int:
        return self.start + self.samples.shape[0]


@dataclasses.dataclass(frozen=True)
class Recording:
    """One recording to transcribe: `key` names it in results; `seconds` (if known) sizes the progress."""

    key: Any
    audio: AudioSource
    prompt: str | None = None
    seconds: float | None = None


def chunk_sizes(chunk_seconds: float, margin_seconds: float) -> tuple[int, int]:
    """(chunk, margin) in samples, checked: 0 < chunk <= 600 s, 0 <= margin < chunk."""
    for name, value in (("chunk_seconds", chunk_seconds), ("margin_seconds", margin_seconds)):
        if not is_number(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not 0 < chunk_seconds <= MAX_CHUNK_SECONDS:
        raise ValueError(f"chunk_seconds must be in (0, {MAX_CHUNK_SECONDS:g}] (AF3 hears at most 10 minutes "
                         f"at once), got {chunk_seconds!r}")
    if not 0 <= margin_seconds < chunk_seconds:
        raise ValueError(f"margin_seconds must be >= 0 and below chunk_seconds ({chunk_seconds:g}), "
                         f"got {margin_seconds!r}")
    chunk, margin = round(chunk_seconds * SAMPLING_RATE), round(margin_seconds * SAMPLING_RATE)
    if chunk - margin <= SILENT_SAMPLES:  # a cut may shorten a chunk by the margin
        raise ValueError(f"chunk_seconds - margin_seconds must be more than {SILENT_SAMPLES / SAMPLING_RATE:g} s, "
                         f"the shortest audio AF3 gets a token from; got {chunk_seconds:g} - {margin_seconds:g}")
    return chunk, margin


def quiet_cut(samples: torch.Tensor, chunk: int, margin: int, frame: int = FRAME_SAMPLES) -> int:
    """Where to end a chunk of `samples` (longer than `chunk`): the cut in [chunk - margin, chunk]
    whose surrounding `frame` samples have the least energy; of equally quiet cuts, the latest."""
    half = frame // 2
    lo, hi = max(0, chunk - margin - half), min(samples.shape[0], chunk + frame - half)
    power = samples[lo:hi].double().square()
    cumulative = torch.cat([power.new_zeros(1), power.cumsum(0)])  # (hi - lo + 1,)
    cuts = torch.arange(chunk - margin, chunk + 1)  # candidate cut positions
    left = (cuts - half).clamp(lo, hi) - lo
    right = (cuts - half + frame).clamp(lo, hi) - lo
    energy = cumulative[right] - cumulative[left]  # (margin + 1,): energy of the frame around each cut
    latest_quietest = energy.shape[0] - 1 - int(torch.argmin(energy.flip(0)))
    return int(cuts[latest_quietest])


def iter_chunks(blocks: Iterable[torch.Tensor], chunk: int, margin: int,
                frame: int = FRAME_SAMPLES) -> Iterator[Chunk]:
    """Cut a stream of sample blocks into chunks of at most `chunk` samples that tile it exactly.

    Every chunk but the last ends at a `quiet_cut`, at least `chunk - margin` samples after it
    starts; the last holds whatever remains (at most `chunk`). Memory holds one chunk plus one block.
    """
    pending: list[torch.Tensor] = []
    held, start = 0, 0

    def cut() -> Chunk:
        nonlocal pending, held, start
        buffer = torch.cat(pending)
        at = quiet_cut(buffer, chunk, margin, frame)
        out = Chunk(start, buffer[:at].clone())  # a copy, so the buffer can be freed
        pending, held, start = [buffer[at:]], held - at, start + at
        return out

    for block in blocks:
        pending.append(block)
        held += block.shape[0]
        while held >= chunk + frame:  # not the last chunk, and the frames around every candidate cut are here
            yield cut()
    while held > chunk:  # the stream has ended: the frames are as complete as they will get
        yield cut()
    if held:
        yield Chunk(start, torch.cat(pending))


def transcribe_recordings(run_batch: BatchRunner, recordings: Sequence[Recording], *,
                          chunk_seconds: float = CHUNK_SECONDS, margin_seconds: float = MARGIN_SECONDS,
                          batch_size: int = 8, pool: int = 4, progress: Progress | None = None,
                          errors: tuple[type[BaseException], ...] = (OSError, ValueError, TypeError, RuntimeError),
                          ) -> Iterator[tuple[Recording, list[Segment] | BaseException]]:
    """Yield (recording, its segments) in the order given; (recording, the exception) for one that failed.

    Chunks of consecutive recordings share batches of `batch_size`: `pool` batches' worth are
    drawn, sorted by length (so that a batch holds chunks of about one length and little compute
    goes to padding) and run; memory holds `pool * batch_size` chunks. `pool=1` runs chunks in
    the order they come. `run_batch(clips, prompts)` returns one text per chunk. A recording that cannot be decoded, or whose chunk fails even in
    a batch of its own, fails alone (exceptions of the `errors` types; others propagate).
    """
    chunk, margin = chunk_sizes(chunk_seconds, margin_seconds)
    expected = sum(1 if r.seconds is None else max(1, math.ceil(r.seconds / chunk_seconds)) for r in recordings)
    n_chunks: dict[int, int] = {}  # recording -> chunks, once all of it is read
    texts: dict[int, dict[int, tuple[int, str]]] = {i: {} for i in range(len(recordings))}
    failed: dict[int, BaseException] = {}
    counts = {"drawn": 0, "done": 0, "audio": 0.0}

    def draw() -> Iterator[tuple[int, Chunk]]:
        for i, rec in enumerate(recordings):
            n = 0
            try:
                for piece in iter_chunks(iter_audio(rec.audio), chunk, margin):
                    n += 1
                    counts["drawn"] += 1
                    yield i, piece
            except errors as e:
                failed[i] = e
            n_chunks[i] = n

    def run(batch: list[tuple[int, Chunk]]) -> None:
        batch = [(i, c) for i, c in batch if i not in failed]
        if not batch:
            return
        clips = [_padded(c) for _, c in batch]
        try:
            out = run_batch(clips, [recordings[i].prompt for i, _ in batch])
        except errors as e:
            if len(batch) == 1:
                failed[batch[0][0]] = e
                return
            for item in batch:  # find the chunk that fails; the others still count
                run([item])
            return
        for (i, c), text in zip(batch, out):
            texts[i][c.start] = (c.end, text)
            counts["done"] += 1
            counts["audio"] += c.samples.shape[0] / SAMPLING_RATE
        if progress is not None:
            progress(counts["done"], max(expected, counts["drawn"]), counts["audio"])

    next_out = 0

    def finished() -> Iterator[tuple[Recording, list[Segment] | BaseException]]:
        nonlocal next_out
        while next_out < len(recordings):
            i = next_out
            if i in failed:
                result: list[Segment] | BaseException = failed[i]
            elif n_chunks.get(i) is not None and len(texts[i]) == n_chunks[i]:
                result = [Segment(_seconds(start), _seconds(end), text.strip())
                          for start, (end, text) in sorted(texts[i].items())]
            else:
                return
            texts[i] = {}
            next_out += 1
            yield recordings[i], result

    def run_pool(drawn: list[tuple[int, Chunk]]) -> None:
        if pool > 1:
            drawn = sorted(drawn, key=lambda item: -item[1].samples.shape[0])  # stable: ties keep their order
        for k in range(0, len(drawn), batch_size):
            run(drawn[k:k + batch_size])

    drawn: list[tuple[int, Chunk]] = []
    for item in draw():
        drawn.append(item)
        if len(drawn) == pool * batch_size:
            run_pool(drawn)
            drawn = []
            yield from finished()
    run_pool(drawn)
    yield from finished()


def known_seconds(source: AudioSource) -> float | None:
    """A recording's length from its header (local files) or shape (arrays); None for URLs, bytes
    and file objects, which are read once only, when they are transcribed."""
    if isinstance(source, (str, os.PathLike, torch.Tensor, np.ndarray)):
        return audio_seconds(source)
    return None


def join_text(segments: Iterable[Segment]) -> str:
    """The text of a whole recording: its segments' texts, space-separated."""
    return " ".join(s.text for s in segments if s.text)


def _seconds(sample: int) -> float:
    return round(sample * 1000 / SAMPLING_RATE) / 1000


def _padded(chunk: Chunk) -> torch.Tensor:
    """A recording's last chunk may be a sliver; give the model at least MIN_TAIL_SAMPLES."""
    n = chunk.samples.shape[0]
    if chunk.start == 0 or n >= MIN_TAIL_SAMPLES:
        return chunk.samples
    return torch.cat([chunk.samples, chunk.samples.new_zeros(MIN_TAIL_SAMPLES - n)])


# ---- subtitles: SRT and WebVTT ------------------------------------------------------------------

_TIME = re.compile(r"^\s*(\d+):(\d{2}):(\d{2})[,.](\d{3})\s*-->\s*(\d+):(\d{2}):(\d{2})[,.](\d{3})")
_VTT_ESCAPES = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"))


def format_srt(segments: Iterable[Segment]) -> str:
    """SubRip: numbered cues `1`, `00:00:00,000 --> 00:00:29,840`, text, blank line."""
    cues = [f"{n}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{_cue_text(s.text)}"
            for n, s in enumerate(segments, 1)]
    return "".join(cue.rstrip("\n") + "\n\n" for cue in cues)


def format_vtt(segments: Iterable[Segment]) -> str:
    """WebVTT: a `WEBVTT` header, then cues `00:00:00.000 --> 00:00:29.840` and text (&, <, > escaped)."""
    cues = []
    for s in segments:
        text = _cue_text(s.text)
        for raw, escaped in _VTT_ESCAPES:
            text = text.replace(raw, escaped)
        cues.append(f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{text}".rstrip("\n") + "\n\n")
    return "WEBVTT\n\n" + "".join(cues)


def parse_srt(text: str) -> list[Segment]:
    """Segments from SubRip text (as `format_srt` writes it, or any well-formed file)."""
    return [_parse_cue(block, "SRT", i) for i, block in enumerate(_blocks(text))]


def parse_vtt(text: str) -> list[Segment]:
    """Segments from WebVTT text; NOTE, STYLE and REGION blocks are skipped."""
    blocks = _blocks(text)
    if not blocks or not blocks[0].startswith("WEBVTT"):
        raise ValueError("not WebVTT: the text does not start with 'WEBVTT'")
    out = []
    for i, block in enumerate(blocks[1:]):
        if block.split(None, 1)[0] in ("NOTE", "STYLE", "REGION"):
            continue
        s = _parse_cue(block, "WebVTT", i)
        for raw, escaped in reversed(_VTT_ESCAPES):
            s = dataclasses.replace(s, text=s.text.replace(escaped, raw))
        out.append(s)
    return out


def _timestamp(seconds: float, comma: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{comma}{ms:03d}"


def _cue_text(text: str) -> str:
    """A blank line ends a cue: keep the text's lines, drop its empty ones. Only \n and \r end
    a line (str.splitlines would also cut at \x0c, \x1d, \u2028 and others a model can write)."""
    lines = text.strip().replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line for line in lines if line.strip())


def _blocks(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").lstrip("\ufeff")
    return [b.strip("\n") for b in re.split(r"\n\s*\n", text) if b.strip()]


def _parse_cue(block: str, kind: str, index: int) -> Segment:
    lines = block.split("\n")
    at = next((n for n, line in enumerate(lines[:2]) if "-->" in line), None)
    match = _TIME.match(lines[at]) if at is not None else None
    if match is None:
        raise ValueError(f"{kind} cue {index + 1}: no 'HH:MM:SS{',' if kind == 'SRT' else '.'}mmm --> ...' "
                         f"timing line in {block[:80]!r}")
    h1, m1, s1, ms1, h2, m2, s2, ms2 = (int(g) for g in match.groups())
    start = (h1 * 3_600_000 + m1 * 60_000 + s1 * 1000 + ms1) / 1000
    end = (h2 * 3_600_000 + m2 * 60_000 + s2 * 1000 + ms2) / 1000
    return Segment(start, end, "\n".join(lines[at + 1:]))
