PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test bench bench-gpu demo clean

install: $(STAMP)

# Re-install only when the declared dependencies change.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: install
	$(VENV)/bin/ruff check af3 weights_convert examples tests
	$(PY) -m pytest -q

# Benchmarks print ratios against HF transformers measured in the same run (never asserted).
bench: install
	@for f in tests/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

# The real model's dimensions (random weights) on a CUDA GPU: decode tokens/s, % of the HBM floor, encoder time.
bench-gpu: install
	$(PY) tests/bench_gpu.py

demo: install
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) build *.egg-info
