"""`make bench` runs every tests/bench_*.py; none of them runs in `make test`, so a rename in af3
(encoder.pooled_lengths -> windows.pooled_length, say) would break a bench unnoticed. Importing
each one (their work is behind `if __name__ == "__main__"`) catches that here."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHES = sorted(p.stem for p in (Path(__file__).parent).glob("bench_*.py"))


def test_there_are_benches() -> None:
    assert {"bench_model", "bench_generate", "bench_mel", "bench_quant"} <= set(BENCHES)


@pytest.mark.parametrize("name", BENCHES)
def test_bench_imports(name: str) -> None:
    module = importlib.import_module(f"tests.{name}")
    assert callable(getattr(module, "main", None)) or 'if __name__ == "__main__"' in Path(module.__file__).read_text()


def test_interleaved_takes_turns() -> None:
    """The benches compare implementations round by round: a, b, a, b, not a, a, b, b."""
    from tests.timing import best, interleaved

    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] * 4  # one warm-up call each, then three rounds
    assert [len(t) for t in times.values()] == [3, 3] and set(best(times)) == {"a", "b"}
    calls.clear()
    interleaved({"a": lambda: calls.append("a")}, 2, warm_up=False)
    assert calls == ["a", "a"]
