"""Summarise a `make mutate` run: the surviving mutants and the kill rate per module.

Reads mutmut's results (mutants/af3/*.py.meta) for the mutant names given on the command line
(fnmatch patterns, as `mutmut run` takes them). A mutant counts as killed when a test failed or
timed out under it; one that no selected test runs ("no tests") counts as a survivor. The kill
rate is killed / (killed + survived + no tests); mutants not checked yet are left out of it.
Show one with `mutmut show NAME`.

`--unchecked PATTERN...` prints instead the names of the mutants not checked yet, one a line:
`mutmut run` given a pattern checks every mutant again, given names only those, so a run that was
stopped resumes with `mutmut run $(python tests/mutation_report.py --unchecked PATTERN...)`.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from collections import Counter
from pathlib import Path

KILLED = {1: "killed", 3: "killed", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout",
          255: "timeout"}
NO_TESTS = {5, 33}


def main(patterns: list[str]) -> int:
    metas = sorted(Path("mutants/af3").glob("*.py.meta"))
    if patterns[:1] == ["--unchecked"]:
        patterns = patterns[1:] or ["*"]
        for meta in metas:
            for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
                if code is None and any(fnmatch.fnmatch(name, p) for p in patterns):
                    print(name)
        return 0
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
            kind = KILLED.get(code, "survived" if code == 0 else "no tests" if code in NO_TESTS
                              else "not checked" if code is None else f"exit {code}")
            status["killed" if kind in ("killed", "timeout") else kind] += 1
            if kind in ("survived", "no tests"):
                print(f"{kind}: {name}")
        totals.update(status)
        print(summary(meta.name.removesuffix(".py.meta"), status))
    print(summary("all", totals))
    return 0


def summary(name: str, status: Counter) -> str:
    done = status["killed"] + status["survived"] + status["no tests"]
    rate = f"{100 * status['killed'] / done:.1f}%" if done else "-"
    return (f"{name:12s} killed {status['killed']:4d}  survived {status['survived']:4d}  no tests "
            f"{status['no tests']:4d}  not checked {status['not checked']:4d}  kill rate {rate}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["*"]))
