PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test bench bench-gpu demo clean

install: $(STAMP)

# Re-install only when the declared dependencies change.
$(STAMP): setup.cfg pyproject.toml
	@echo "[install] creating the virtual environment $(VENV)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[install] upgrading pip"
	$(PY) -m pip install --quiet --upgrade pip
	@echo "[install] installing af3 (editable) and its dependencies: torch with its CUDA libraries is"
	@echo "[install] about 5.7 GB in the venv, so this takes minutes; pip shows each download below"
	$(PY) -m pip install --progress-bar on -e '.[test]'
	@echo "[install] done: $(VENV) is ready (make install does nothing more until setup.cfg changes)"
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
