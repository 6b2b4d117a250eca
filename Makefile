PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test bench bench-gpu demo mutate mutate-resume clean

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

# Mutation testing (outside `make test`): mutmut changes the math one operator at a time and runs
# the tests that cover the changed function ([mutmut] in setup.cfg lists the files and tests).
# Mutants are picked by name (module.function), so the target follows the code as it changes.
# Prints the surviving mutants and the kill rate; `mutmut show NAME` shows one.
# MUTANTS="af3.qwen2.*" make mutate runs one module; `make mutate-resume` checks only the mutants
# a stopped run left unchecked. One thread per test process, MUTATE_CHILDREN processes at once.
MUTANTS ?= af3.attention.* af3.encoder.* af3.projector.* af3.qwen2.* af3.model.* af3.mel.* af3.windows.* \
	af3.generation.x_seen_mask* af3.generation.x_apply_* af3.generation.x_process_scores*
MUTATE_CHILDREN ?= 2
MUTMUT := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATE_CHILDREN)
mutate: install
	$(PY) -m pip install --quiet 'mutmut>=3.8,<4'
	$(MUTMUT) $(foreach m,$(MUTANTS),'$(m)')
	$(PY) tests/mutation_report.py $(foreach m,$(MUTANTS),'$(m)')

mutate-resume: install
	$(PY) -m pip install --quiet 'mutmut>=3.8,<4'
	names=$$($(PY) tests/mutation_report.py --unchecked $(foreach m,$(MUTANTS),'$(m)')); \
	if [ -n "$$names" ]; then $(MUTMUT) $$names; fi
	$(PY) tests/mutation_report.py $(foreach m,$(MUTANTS),'$(m)')

clean:
	rm -rf $(VENV) build *.egg-info mutants
