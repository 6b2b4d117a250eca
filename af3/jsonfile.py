"""Reading JSON from files af3 did not write (config, tokenizer, index, headers), safely.

`json.loads` lets two things through as tracebacks rather than "invalid file": nesting deep
enough to exhaust the recursion limit (`[` x 100 000 gives RecursionError) and integers too
long to convert (Python's 4300-digit limit, a message that names no file). Every JSON reader in
af3 and weights_convert goes through `parse_json`, which turns both into a ValueError naming
the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# The longest integer a checkpoint can mean: 2**64 has 20 digits.
MAX_INT_DIGITS = 40


def parse_json(data: bytes | str, where: str) -> Any:
    """Parse JSON text; a ValueError starting with `where` (the file) for anything that is not
    valid JSON, nested too deeply, or holds an integer of more than MAX_INT_DIGITS digits."""
    try:
        return json.loads(data, parse_int=_parse_int)
    except RecursionError:
        raise ValueError(f"{where}: not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    except ValueError as e:  # from _parse_int
        raise ValueError(f"{where}: not valid JSON ({e}{_field_of_long_integer(data)})") from None


def read_json_file(path: str | Path) -> Any:
    """`parse_json` of a file's bytes (UTF-8, checked by json); FileNotFoundError if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return parse_json(path.read_bytes(), str(path))


def _field_of_long_integer(data: bytes | str) -> str:
    """', in "key"': the last key before the first over-long integer, to say where it is."""
    text = data if isinstance(data, str) else data.decode("utf-8", errors="replace")
    number = re.search(rf"[-\d]\d{{{MAX_INT_DIGITS},}}", text)
    keys = re.findall(r'"((?:[^"\\]|\\.)*)"\s*:', text[: number.start()]) if number else []
    return f", in {keys[-1]!r}" if keys else ""


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {digits} digits; at most {MAX_INT_DIGITS} are accepted")
    return int(text)
