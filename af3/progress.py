"""Progress of long work: tensors and bytes loaded or converted, chunks of audio transcribed.

On a terminal it is one line that rewrites itself (at most 5 times a second); elsewhere (a log
file, CI) it writes a line per 10% so the log stays short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class _ProgressLine:
    """The one line both kinds of progress draw: when to draw it, and how."""

    def __init__(self, stream: TextIO | None = None, label: str = ""):
        self.stream = sys.stderr if stream is None else stream
        self.label = label
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self.last = 0.0
        self.next_tenth = 1
        self.open_line = False  # a progress line on a terminal not yet ended by a newline

    def _due(self, done: float, total: float, finished: bool) -> bool:
        """On a terminal at most 5 times a second; elsewhere once per 10% of `total`; always at the end."""
        if self.tty:
            now = time.monotonic()
            if not finished and now - self.last < 0.2:
                return False
            self.last = now
            return True
        tenth = int(10 * done // max(total, 1))
        if not finished and tenth < self.next_tenth:
            return False
        self.next_tenth = tenth + 1
        return True

    def _draw(self, line: str, finished: bool) -> None:
        if self.tty:
            self.stream.write("\r" + self.label + line + ("\n" if finished else ""))
            self.open_line = not finished
        else:
            self.stream.write(self.label + line + "\n")
        self.stream.flush()

    def end_line(self) -> None:
        """End an unfinished progress line, so that what is printed next starts on its own line."""
        if self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False


class TensorProgress(_ProgressLine):
    """Call with (tensors done, tensors in all, bytes done, bytes in all) after each tensor."""

    def __call__(self, n_done: int, n_total: int, bytes_done: int, bytes_total: int) -> None:
        finished = n_done == n_total
        if self._due(bytes_done, bytes_total, finished):
            self._draw(f"{n_done}/{n_total} tensors, {format_size(bytes_done)} of {format_size(bytes_total)} "
                       f"({100 * bytes_done / max(bytes_total, 1):.0f}%)", finished)


def format_size(n: int) -> str:
    """Bytes as '1.23 GB' (from 0.1 GB up) or '45.6 MB'."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class ChunkProgress(_ProgressLine):
    """Call with (chunks done, chunks expected, audio seconds done) after each batch of long-form work.

    Draws `chunk 12/240, 360 s of audio, 45.1 s/s` on a terminal (at most 5 times a second);
    elsewhere a line per 10% of the expected chunks.
    """

    def __call__(self, done: int, expected: int, audio_seconds: float) -> None:
        finished = done >= expected
        if self._due(done, expected, finished):
            speed = audio_seconds / max(time.monotonic() - self.started, 1e-9)
            self._draw(f"chunk {done}/{expected}, {audio_seconds:.0f} s of audio, {speed:.1f} s/s", finished)
