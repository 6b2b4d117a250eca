"""Benchmark: af3.tokenizer vs HF `tokenizers` (Rust) on English prose, plus tokenizer.json load time.

    .venv/bin/python tests/bench_tokenizer.py [path/to/tokenizer.json]

Uses ../shared/af3-tokenizer/tokenizer.json when present, else the tiny generated tokenizer. The
prose is the docstrings of Python's standard library (English, a few MB, no download). af3 is
timed with a cold word cache (first pass) and a warm one (second pass over the same text).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from af3.tokenizer import Tokenizer
from tests.timing import best, interleaved
from tests.tiny_tokenizer import write_tiny_tokenizer

TARGET_BYTES = 2_000_000


def _try_import(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 (a module that cannot be imported on this machine is left out)
        return None


def english_prose(target: int = TARGET_BYTES) -> list[str]:
    """Docstrings of standard-library modules, classes and functions, in a fixed order."""
    parts, size = [], 0
    names = sorted(m.name for m in pkgutil.iter_modules() if not m.name.startswith("_"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            if size >= target:
                break
            if name in {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}:
                continue
            module = _try_import(name)
            if module is None:
                continue
            if getattr(module, "__file__", "") and "site-packages" in module.__file__:
                continue  # stdlib only, so the text is the same on every machine with this Python
            for obj in [module, *vars(module).values()]:
                doc = getattr(obj, "__doc__", None) if callable(obj) or obj is module else None
                if isinstance(doc, str) and len(doc) > 200:
                    parts.append(doc)
                    size += len(doc.encode())
    return list(dict.fromkeys(parts))  # each docstring once


def main() -> None:
    if len(sys.argv) > 1:
        path = Path(sys.argv[1])
    elif (REPO.parent / "shared" / "af3-tokenizer" / "tokenizer.json").is_file():
        path = REPO.parent / "shared" / "af3-tokenizer" / "tokenizer.json"
    else:
        path = write_tiny_tokenizer(tempfile.mkdtemp())
    try:
        import tokenizers
    except ImportError:
        sys.exit("HF tokenizers is not installed; it is the reference this benchmark compares against")

    paragraphs = english_prose()
    text = "\n\n".join(paragraphs)
    mb = len(text.encode()) / 1e6
    print(f"tokenizer: {path}\ntext: {mb:.2f} MB of English prose (stdlib docstrings, {len(paragraphs)} paragraphs)")

    load = best(interleaved({"af3": lambda: Tokenizer.from_file(path),
                             "HF": lambda: tokenizers.Tokenizer.from_file(str(path))}, 3))
    ours, hf = Tokenizer.from_file(path), tokenizers.Tokenizer.from_file(str(path))

    # Per paragraph, the way prompts arrive; one thread each (HF's encode_batch would use all cores).
    start = time.perf_counter()
    ids = [ours.encode(p) for p in paragraphs]
    cold = time.perf_counter() - start
    if ids != [e.ids for e in hf.encode_batch(paragraphs, add_special_tokens=False)]:
        sys.exit("MISMATCH: af3 and HF give different ids on the benchmark text")
    flat = [i for row in ids for i in row]
    t = best(interleaved({"af3": lambda: [ours.encode(p) for p in paragraphs],
                          "HF": lambda: [hf.encode(p, add_special_tokens=False) for p in paragraphs],
                          "af3 one string": lambda: ours.encode(text),
                          "HF one string": lambda: hf.encode(text, add_special_tokens=False),
                          "af3 decode": lambda: ours.decode(flat),
                          "HF decode": lambda: hf.decode(flat, skip_special_tokens=False)}, 3, warm_up=False))
    ours_load, hf_load, warm, hf_time = load["af3"], load["HF"], t["af3"], t["HF"]
    one_ours, one_hf, ours_decode, hf_decode = t["af3 one string"], t["HF one string"], t["af3 decode"], t["HF decode"]

    rows = [("load tokenizer.json (s)", ours_load, hf_load, hf_load / ours_load),
            ("encode, cold cache (MB/s)", mb / cold, mb / hf_time, hf_time / cold),
            ("encode, warm cache (MB/s)", mb / warm, mb / hf_time, hf_time / warm),
            ("encode as one string (MB/s)", mb / one_ours, mb / one_hf, one_hf / one_ours),
            ("decode (MB/s)", mb / ours_decode, mb / hf_decode, hf_decode / ours_decode)]
    print(f"{'':30}{'af3':>10}{'HF':>10}{'speedup':>9}")
    for name, a, b, ratio in rows:
        print(f"{name:30}{a:10.3f}{b:10.3f}{ratio:9.2f}")
    print(f"({len(flat)} tokens, ids identical; speedup = HF time / af3 time, > 1 means af3 is faster)")


if __name__ == "__main__":
    main()
