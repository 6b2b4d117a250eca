"""Reading JSON from files af3 did not write (config, tokenizer, index, headers), safely.

`json.loads` lets two things through as tracebacks rather than "invalid file": nesting deep
enough to exhaust the recursion limit (`[` x 100 000 gives RecursionError) and integers too
long to convert (Python's 4300-digit limit, whose message names neither the file nor the key).
Every JSON reader in af3 and weights_convert goes through `parse_json` (the JSON-lines files a
line at a time: corpus manifests and results, fine-tuning manifests), which turns both into a
ValueError naming the file (and the key of a long integer).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def parse_json(data: bytes | str, where: str) -> Any:
    """Parse JSON text; a ValueError starting with `where` (the file; "" when the caller names it)
    for anything that is not valid JSON, is nested too deeply, or holds an integer longer than
    Python converts (4300 digits; the error then names the key it was under)."""
    prefix = f"{where}: " if where else ""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"{prefix}not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and int()'s digit limit
        digits = re.search(r"value has (\d+) digits", str(e))
        reason = f"an integer of {digits.group(1)} digits{_field_of_long_integer(data)}" if digits else str(e)
        raise ValueError(f"{prefix}not valid JSON ({reason})") from None


def read_json_file(path: str | Path) -> Any:
    """`parse_json` of a file's bytes (UTF-8, checked by json); FileNotFoundError if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return parse_json(path.read_bytes(), str(path))


def check_utf8(path: Path) -> None:
    """A ValueError naming the line and byte where the file at `path` stops being UTF-8 text
    (a JSON-lines manifest is read a line at a time; Python's own error names neither)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None


def _field_of_long_integer(data: bytes | str) -> str:
    """', in "key"': the last key before the first over-long integer, to say where it is."""
    text = data if isinstance(data, str) else data.decode("utf-8", errors="replace")
    number = re.search(r"\d{4000,}", text)
    keys = re.findall(r'"((?:[^"\\]|\\.)*)"\s*:', text[: number.start()]) if number else []
    return f", in {keys[-1]!r}" if keys else ""
