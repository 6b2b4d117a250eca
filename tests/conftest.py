"""Shared fixtures. Tests that need ../shared skip with a clear reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER_DIR = REPO.parent / "shared" / "af3-tokenizer"


@pytest.fixture(scope="session")
def shared_tokenizer_dir() -> Path:
    """The real AF3 tokenizer (../shared/af3-tokenizer); skips the test when it is absent."""
    if not (SHARED_TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip(f"real AF3 tokenizer not found at {SHARED_TOKENIZER_DIR} (../shared is absent)")
    return SHARED_TOKENIZER_DIR


# Under `make mutate`, the order in which a mutant's tests run: the files that fail fastest on a
# wrong line first (cheap fixtures, exact parity), the ones with costly fixtures last.
MUTATION_FILE_ORDER = ("test_windows.py", "test_model_inputs.py", "test_bf16_parity.py", "test_generation.py",
                       "test_mel.py", "test_model.py", "test_loss_padding.py")


@pytest.hookimpl(trylast=True)  # after pytest groups the tests by their parametrized fixtures
def pytest_collection_modifyitems(config, items):
    """Under `make mutate` (mutmut sets MUTANT_UNDER_TEST and runs with -x), run each file's tests
    together (its module fixtures built once, not once per interleaved test), in
    MUTATION_FILE_ORDER, so that most mutants fail within seconds."""
    if not os.environ.get("MUTANT_UNDER_TEST"):
        return
    rank = {name: i for i, name in enumerate(MUTATION_FILE_ORDER)}
    items.sort(key=lambda item: (rank.get(item.fspath.basename, len(rank)), item.fspath.basename))  # stable


@pytest.fixture(autouse=True)
def examples_default_to_the_cpu(monkeypatch):
    """The example scripts run on the CPU in tests unless a test names a --device: on a machine
    with a GPU their default (cuda, bf16) would make their output differ from the CPU-computed
    expectations the tests compare it with. The GPU path has its own tests."""
    import examples._common

    monkeypatch.setattr(examples._common, "default_device", lambda: "cpu")
