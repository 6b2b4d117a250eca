"""Streaming: turn token ids arriving one step at a time into text pieces.

Byte-level BPE splits a multi-byte character (é, 中, an emoji) across tokens; decoding such a
prefix gives U+FFFD. The streamer holds text back while the decoded tail is incomplete, so a
piece never contains half a character.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_REPLACEMENT = "\ufffd"


class TextStreamer:
    """Calls `on_text(piece)` with newly decoded text; pass it to `generate(streamer=...)`.

    Special tokens (eos, padding) are skipped unless `skip_special_tokens=False`.
    """

    def __init__(self, tokenizer: Any, on_text: Callable[[str], Any] | None = None,
                 skip_special_tokens: bool = True) -> None:
        if on_text is not None and not callable(on_text):
            raise TypeError(f"on_text must be a function that takes a str, got {type(on_text).__name__}")
        self.tokenizer = tokenizer
        self.on_text = on_text if on_text is not None else _print
        self.skip_special_tokens = skip_special_tokens
        self.pending: list[int] = []  # ids not yet decoded to complete characters
        self.emitted = 0  # characters of decode(pending) already handed out

    def put(self, ids: torch.Tensor | list[int] | int) -> None:
        """Add the next token id(s) of a single sequence."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        elif isinstance(ids, int):
            ids = [ids]
        self.pending.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip_special_tokens)
        if text.endswith(_REPLACEMENT):
            # Incomplete character at the end: hand out only what comes before it.
            stable = text.rstrip(_REPLACEMENT)
            self._emit(stable[self.emitted:])
            self.emitted = max(self.emitted, len(stable))
        else:
            # Everything decoded is complete: start the next window fresh (keeps decoding O(1)).
            self._emit(text[self.emitted:])
            self.pending, self.emitted = [], 0

    def end(self) -> None:
        """Flush whatever is left (a genuinely invalid byte sequence comes out as U+FFFD)."""
        if self.pending:
            text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip_special_tokens)
            self._emit(text[self.emitted:])
        self.pending, self.emitted = [], 0

    def _emit(self, piece: str) -> None:
        if piece:
            self.on_text(piece)


def _print(piece: str) -> None:
    print(piece, end="", flush=True)
