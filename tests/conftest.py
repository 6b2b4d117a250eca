"""Shared fixtures. Tests that need ../shared skip with a clear reason when it is absent."""

from __future__ import annotations

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
