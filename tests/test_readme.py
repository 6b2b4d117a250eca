"""Every ```python block of README.md runs as-is against a tiny checkpoint, so the docs cannot rot.

The blocks name `af3-checkpoint` and `speech.wav`; the test makes both in a temporary working
directory: a tiny random HF checkpoint converted by weights_convert, and 2 s of synthetic audio.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile

from af3.generation import GenerationConfig
from tests.tiny_tokenizer import TINY_TOKEN_IDS
from weights_convert.convert import convert

TINY_TOKENIZER_SIZE = max(TINY_TOKEN_IDS.values()) + 1

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from tests.tiny_checkpoint import write_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("readme")
    # A longer context than the default tiny one: the README asks for up to 500 new tokens.
    # Embedding rows = tokenizer ids, so random weights only emit ids the tokenizer can decode.
    write_tiny_hf_checkpoint(root / "hf", max_position_embeddings=4096, vocab_size=TINY_TOKENIZER_SIZE)
    convert(root / "hf", root / "af3-checkpoint")
    # Random weights rarely say eos: a short default keeps the blocks that rely on it quick.
    config = root / "af3-checkpoint" / "generation_config.json"
    GenerationConfig.load(config).replace(max_new_tokens=16).save(config)
    t = np.arange(32000) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * np.random.default_rng(0).standard_normal(t.size)
    soundfile.write(str(root / "speech.wav"), wave.astype(np.float32), 16000)
    return root


def test_readme_has_the_usage_patterns():
    assert len(BLOCKS) >= 7
    text = README.read_text()
    head = text[:text.index("## ", text.index("\n") + 1)]
    assert "make demo" in head and "make test" in head
    for needle in ("apply_transcription_request", "output_labels", "think=True", "start_chat", "weights_convert"):
        assert needle in text


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = compile(BLOCKS[index], f"README.md python block {index}", "exec")
        exec(code, {"__name__": "__readme__"})  # noqa: S102 -- running the README's code is the point
    assert out.getvalue(), "every README block prints something"
