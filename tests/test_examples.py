"""The example scripts, run in-process on a tiny converted checkpoint, and `make demo`'s script."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from af3.generation import GenerationConfig
from tests.tiny_tokenizer import TINY_TOKEN_IDS
from weights_convert.convert import convert

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tests.tiny_checkpoint import write_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("examples")
    write_tiny_hf_checkpoint(root / "hf", vocab_size=max(TINY_TOKEN_IDS.values()) + 1)
    convert(root / "hf", root / "ckpt")
    config = root / "ckpt" / "generation_config.json"
    GenerationConfig.load(config).replace(max_new_tokens=6).save(config)
    rng = np.random.default_rng(0)
    for name, seconds in (("a.wav", 1.5), ("b.flac", 0.7)):
        soundfile.write(str(root / name), (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32),
                        16000)
    (root / "broken.wav").write_bytes(b"RIFF not really a wav file")
    return root


def test_transcribe_one_line_per_file_and_errors_on_stderr(files, capsys):
    a, b, bad = str(files / "a.wav"), str(files / "b.flac"), str(files / "broken.wav")
    ckpt = ["--checkpoint", str(files / "ckpt"), "--greedy"]
    rc = example("transcribe").main([a, bad, b, *ckpt, "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [a, b]
    assert err.count("error:") == 1 and bad in err

    assert example("transcribe").main([a, b, *ckpt, "--json", "--batch-size", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in rows] == [a, b]
    assert [f"{r['path']}\t{r['text']}" for r in rows] == lines or all("\n" in r["text"] or "\t" in r["text"]
                                                                     for r in rows)

    # One file: streamed, and the same line as without streaming.
    assert example("transcribe").main([a, *ckpt]) == 0
    assert capsys.readouterr().out.splitlines() == lines[:1]


def test_transcribe_bad_checkpoint_and_arguments(files, capsys):
    assert example("transcribe").main([str(files / "a.wav"), "--checkpoint", str(files / "nope")]) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        example("transcribe").main([str(files / "a.wav"), "--checkpoint", str(files / "ckpt"), "--batch-size", "0"])


def test_chat_multi_turn_from_piped_questions(files, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is it?\nAnd then?\n\n"))
    assert example("chat").main([str(files / "a.wav"), "--checkpoint", str(files / "ckpt"), "--greedy"]) == 0
    out = capsys.readouterr().out
    assert out.count("af3> ") == 2


def test_train_step_lowers_nothing_silently(files, capsys):
    assert example("train_step").main([str(files / "a.wav"), "Hello world.", "--checkpoint", str(files / "ckpt"),
                                       "--lr", "1e-3"]) == 0
    out = capsys.readouterr().out
    before, after = (float(x) for x in out.split()[2::4][:1] + out.split()[-1:])
    assert before > after  # one AdamW step on the same batch lowers its loss


def test_demo_builds_converts_and_transcribes(tmp_path, capsys, monkeypatch):
    demo = example("demo")
    root = tmp_path / ".demo"
    for name, value in (("DEMO", root), ("HF_DIR", root / "hf-checkpoint"), ("AF3_DIR", root / "af3-checkpoint"),
                        ("WAV", root / "speech.wav"), ("DONE", root / "built")):
        monkeypatch.setattr(demo, name, value)
    assert demo.main() == 0
    out = capsys.readouterr().out
    assert "RANDOM" in out and "weights_convert" in out and (root / "built").exists()
    assert (root / "af3-checkpoint" / "config.json").exists() and (root / "speech.wav").exists()
