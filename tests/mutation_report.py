"""Summarise a `make mutate` run: the surviving mutants and the kill rate per module.

Reads mutmut's results (mutants/af3/*.py.meta) for the mutant names given on the command line
(fnmatch patterns, as `mutmut run` takes them). A mutant counts as killed when a test failed or
timed out under it; the kill rate is killed / (killed + survived). Show one with `mutmut show NAME`.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from collections import Counter
from pathlib import Path

KILLED = {1: "killed", 3: "killed", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout",
          255: "timeout"}


def main(patterns: list[str]) -> int:
    metas = sorted(Path("mutants/af3").glob("*.py.meta"))
    if not metas:
        print("no mutmut results under mutants/af3: run `make mutate` first", file=sys.stderr)
        return 1
    totals: Counter = Counter()
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        picked = {k: v for k, v in codes.items() if any(fnmatch.fnmatch(k, p) for p in patterns)}
        if not picked:
            continue
        status = Counter()
        for name, code in sorted(picked.items()):
            kind = KILLED.get(code, "survived" if code == 0 else "not checked" if code is None else f"exit {code}")
            status["killed" if kind in ("killed", "timeout") else kind] += 1
            if kind == "survived":
                print(f"survived: {name}")
        totals.update(status)
        done = status["killed"] + status["survived"]
        rate = f"{100 * status['killed'] / done:.1f}%" if done else "-"
        print(f"{meta.name.removesuffix('.py.meta'):12s} killed {status['killed']:4d}  survived "
              f"{status['survived']:4d}  other {sum(status.values()) - done:4d}  kill rate {rate}")
    done = totals["killed"] + totals["survived"]
    if done:
        print(f"{'all':12s} killed {totals['killed']:4d}  survived {totals['survived']:4d}  "
              f"kill rate {100 * totals['killed'] / done:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["*"]))
