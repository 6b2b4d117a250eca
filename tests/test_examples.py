"""The example scripts, run in-process on a tiny converted checkpoint, and `make demo`'s script."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tests.tiny_checkpoint import write_tiny_af3_checkpoint

    root = tmp_path_factory.mktemp("examples")
    write_tiny_af3_checkpoint(root, max_new_tokens=6)
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
    # The plain lines hold the same text, newlines and tabs turned into spaces.
    assert [f"{r['path']}\t{r['text']}".replace("\n", " ") for r in rows] == [
        line.split("\t", 1)[0] + "\t" + line.split("\t", 1)[1] for line in lines]
    assert [r["text"].replace("\n", " ").replace("\t", " ") for r in rows] == [
        line.split("\t", 1)[1] for line in lines]

    # One file: streamed, and the same line as without streaming.
    assert example("transcribe").main([a, *ckpt]) == 0
    assert capsys.readouterr().out.splitlines() == lines[:1]


def test_transcribe_bad_checkpoint_and_arguments(files, capsys):
    assert example("transcribe").main([str(files / "a.wav"), "--checkpoint", str(files / "nope")]) == 101
    assert "cannot load checkpoint" in capsys.readouterr().err
    a, ckpt = str(files / "a.wav"), ["--checkpoint", str(files / "ckpt")]
    for args, message in (([a, *ckpt, "--batch-size", "0"], "--batch-size must be >= 1"),
                          ([a, a, *ckpt, "--format", "srt"], "--format srt takes one audio file, got 2"),
                          ([a, *ckpt, "--chunk-seconds", "601"], r"--chunk-seconds must be in \(0, 600\]"),
                          ([a, *ckpt, "--chunk-seconds", "5", "--margin-seconds", "5"],
                           "--margin-seconds must be >= 0 and below --chunk-seconds"),
                          ([*ckpt, "--manifest", a], "--manifest needs --output"),
                          ([a, *ckpt, "--manifest", a, "--output", "x"], "give audio files or --manifest, not both"),
                          ([a, *ckpt, "--output", "x"], "--output goes with --manifest"),
                          ([*ckpt], "give audio files, or --manifest FILE --output FILE")):
        with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
            example("transcribe").main(args)
        assert re.search(message, capsys.readouterr().err), message


def test_chat_multi_turn_from_piped_questions(files, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is it?\nAnd then?\n\n"))
    assert example("chat").main([str(files / "a.wav"), "--checkpoint", str(files / "ckpt"), "--greedy"]) == 0
    out = capsys.readouterr().out
    assert out.count("af3> ") == 2


def test_compile_flag_gives_the_same_transcripts_and_replies(files, capsys, monkeypatch):
    import af3

    a, b, ckpt = str(files / "a.wav"), str(files / "b.flac"), ["--checkpoint", str(files / "ckpt"), "--greedy"]
    real_load, compiled = af3.load, []
    monkeypatch.setattr(af3, "load", lambda *args, **kw: compiled.append(kw.get("compile")) or real_load(*args, **kw))
    outputs = {}
    for flags in ([], ["--compile"]):
        assert example("transcribe").main([a, b, *ckpt, "--json", "--batch-size", "2", *flags]) == 0
        monkeypatch.setattr(sys, "stdin", io.StringIO("What is it?\nAnd then?\n\n"))
        assert example("chat").main([a, *ckpt, *flags]) == 0
        outputs[bool(flags)] = capsys.readouterr().out
    assert compiled == [False, False, True, True]
    assert outputs[True] == outputs[False] and outputs[True].count("af3> ") == 2


def test_chat_quantize_runs_the_quantized_model(files, capsys, monkeypatch):
    import af3
    from af3.audio import load_audio
    from af3.quant import Int8Linear

    chat, a, ckpt = example("chat"), str(files / "a.wav"), str(files / "ckpt")
    questions = ("What is it?", "And then?")
    real_load, loaded = af3.load, []
    monkeypatch.setattr(af3, "load", lambda *args, **kw: loaded.append(real_load(*args, **kw)) or loaded[-1])
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(questions) + "\n\n"))
    assert chat.main([a, "--checkpoint", ckpt, "--greedy", "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert [type(m.model.decoder.layers[1].mlp.down) for m in loaded] == [Int8Linear]
    # The replies, streamed piece by piece, are those of the bundle af3.load(quantize="int8") gives.
    session = real_load(ckpt, quantize="int8").start_chat(load_audio(a))
    want = []
    for q in questions:
        pieces: list[str] = []
        session.ask(q, do_sample=False, stream=pieces.append)
        want.append("af3> " + "".join(pieces) + "\n")
    assert out == "".join(want)
    # int4 with the default group size 128 cannot fit this model's 48 inputs: said, not ignored.
    assert chat.main([a, "--checkpoint", ckpt, "--quantize", "int4"]) == 2
    err = capsys.readouterr().err
    assert "its 48 inputs are not a multiple of any int4 group size" in err and "quantize with int8" in err, err


def test_train_step_lowers_nothing_silently(files, capsys):
    assert example("train_step").main([str(files / "a.wav"), "Hello world.", "--checkpoint", str(files / "ckpt"),
                                       "--lr", "1e-3"]) == 0
    out = capsys.readouterr().out
    before, after = (float(x) for x in out.split()[2::4][:1] + out.split()[-1:])
    assert before > after  # one AdamW step on the same batch lowers its loss


def test_demo_builds_converts_and_transcribes(tmp_path, capsys, monkeypatch):
    demo = example("demo")
    root = tmp_path / ".demo"
    assert demo.main(root) == 0
    out = capsys.readouterr().out
    assert "RANDOM" in out and "weights_convert" in out and (root / "built").exists()
    assert f"the checkpoint {root / 'af3-checkpoint'}/ and the clip {root / 'speech.wav'}" in out
    assert (root / "af3-checkpoint" / "config.json").exists() and (root / "speech.wav").exists()


def test_error_lines_name_the_file_once(files, capsys):
    missing, bad = str(files / "missing.wav"), str(files / "broken.wav")
    rc = example("transcribe").main([missing, bad, "--checkpoint", str(files / "ckpt")])
    err = capsys.readouterr().err
    assert rc == 2 and [line.count(p) for line, p in zip(err.splitlines(), (missing, bad))] == [1, 1], err
    # The exit status counts failures, capped below the statuses a shell reads as signals.
    assert example("transcribe").main([missing] * 101 + ["--checkpoint", str(files / "ckpt")]) == 100
    assert capsys.readouterr().err.count("audio file not found") == 101


def test_transcribe_ctrl_c_is_not_a_traceback(files, capsys, monkeypatch):
    transcribe = example("transcribe")

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr("af3.longform.iter_audio", interrupted)
    assert transcribe.main([str(files / "a.wav"), "--checkpoint", str(files / "ckpt")]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_chat_arguments_and_end_of_input(files, capsys, monkeypatch):
    chat, a, ckpt = example("chat"), str(files / "a.wav"), ["--checkpoint", str(files / "ckpt")]
    for option in ("--max-tokens", "--max-new-tokens"):
        with pytest.raises(SystemExit, match="^2$"):  # --max-tokens 0 was a traceback from start_chat
            chat.main([a, *ckpt, option, "0"])
        assert f"{option} must be >= 1" in capsys.readouterr().err

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal(""))  # Ctrl-D at the first prompt
    assert chat.main([a, *ckpt]) == 0
    assert capsys.readouterr().out == "you> \n"  # the shell prompt starts on its own line
    missing = str(files / "missing.wav")
    assert chat.main([missing, *ckpt]) == 1
    err = capsys.readouterr().err
    assert err.count(missing) == 1 and "Traceback" not in err


def test_train_step_errors_are_one_line(files, capsys, tmp_path):
    train = example("train_step")
    assert train.main([str(files / "missing.wav"), "x", "--checkpoint", str(files / "ckpt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "audio file not found" in err and err.count("\n") == 1
    assert train.main([str(files / "a.wav"), "x", "--checkpoint", str(files / "nope")]) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        train.main([str(files / "a.wav"), "x", "--checkpoint", str(files / "ckpt"), "--lr", "-1"])
    assert "--lr must be > 0" in capsys.readouterr().err
    soundfile.write(str(tmp_path / "few.wav"), np.zeros(100, dtype=np.float32), 16000)
    assert train.main([str(tmp_path / "few.wav"), "x", "--checkpoint", str(files / "ckpt")]) == 1
    assert f"error: {tmp_path / 'few.wav'}: clip 0 of sample 0: 100 samples is too short" in capsys.readouterr().err


def test_transcribe_decodes_a_batch_at_a_time_and_keeps_repeats(files, capsys, monkeypatch):
    import af3.bundle
    import af3.longform

    a, b = str(files / "a.wav"), str(files / "b.flac")
    real_iter, real_chunks, events = af3.longform.iter_audio, af3.bundle.AF3.transcribe_chunks, []

    def decode(path, *rest):
        events.append(("decode", path))
        return real_iter(path, *rest)

    def transcribe_chunks(self, clips, *rest, **kw):
        events.append(("transcribe", len(clips)))
        return real_chunks(self, clips, *rest, **kw)

    monkeypatch.setattr(af3.longform, "iter_audio", decode)
    monkeypatch.setattr(af3.bundle.AF3, "transcribe_chunks", transcribe_chunks)
    rc = example("transcribe").main([a, b, a, *("--checkpoint", str(files / "ckpt"), "--greedy", "--batch-size", "2")])
    out = capsys.readouterr().out
    assert rc == 0
    assert [line.split("\t")[0] for line in out.splitlines()] == [a, b, a]  # a file named twice: two lines
    # Memory holds one batch of audio: the third file is decoded after the first batch is done.
    assert events == [("decode", a), ("decode", b), ("transcribe", 2), ("decode", a), ("transcribe", 1)]


def test_transcribe_long_file_as_subtitles_and_a_manifest(files, capsys, tmp_path):
    import af3
    from af3.longform import parse_srt, parse_vtt

    long = tmp_path / "long.wav"
    soundfile.write(str(long), (0.1 * np.random.default_rng(5).standard_normal(16000 * 13)).astype(np.float32), 16000)
    ckpt = ["--checkpoint", str(files / "ckpt"), "--greedy", "--chunk-seconds", "6", "--margin-seconds", "1"]
    segments = af3.load(files / "ckpt").transcribe_segments(str(long), chunk_seconds=6, margin_seconds=1,
                                                            do_sample=False)
    assert len(segments) == 3
    for fmt, parse in (("srt", parse_srt), ("vtt", parse_vtt)):
        assert example("transcribe").main([str(long), *ckpt, "--format", fmt]) == 0
        assert parse(capsys.readouterr().out) == segments
    assert example("transcribe").main([str(long), str(files / "a.wav"), *ckpt, "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["segments"] == [s.to_dict() for s in segments] and rows[1]["path"] == str(files / "a.wav")

    manifest = tmp_path / "m.txt"
    manifest.write_text(f"{long}\n{files / 'broken.wav'}\n{files / 'missing.wav'}\n{files / 'a.wav'}\n")
    out = tmp_path / "out.jsonl"
    assert example("transcribe").main(["--manifest", str(manifest), "--output", str(out), *ckpt]) == 2
    assert "2 recording(s) failed" in capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [("error" in r) for r in records] == [False, True, True, False]
    assert records[0]["segments"] == rows[0]["segments"]
    assert example("transcribe").main(["--manifest", str(tmp_path / "nope"), "--output", str(out), *ckpt]) == 101
    assert "manifest not found" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["transcribe", "chat", "train_step", "demo", "finetune"])
def test_help_answers_without_importing_torch(name):
    import subprocess

    run = subprocess.run([sys.executable, "-X", "importtime", str(EXAMPLES / f"{name}.py"), "--help"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0 and run.stdout.startswith("usage:"), run.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "af3" not in imported and "torch" not in imported and "numpy" not in imported


def test_names_restated_for_a_fast_help_equal_the_originals():
    """--help imports neither torch nor af3, so a few names are restated: each must equal the original."""
    from af3.config import DTYPE_NAMES
    from af3.longform import MAX_CHUNK_SECONDS
    from examples._common import DTYPE_NAMES as EXAMPLE_DTYPES
    from weights_convert import __main__ as convert_cli
    from weights_convert.convert import DTYPE_CHOICES

    assert sorted(EXAMPLE_DTYPES) == sorted(DTYPE_NAMES)
    assert sorted(convert_cli.DTYPE_CHOICES) == sorted(DTYPE_CHOICES)
    assert example("transcribe").MAX_CHUNK_SECONDS == MAX_CHUNK_SECONDS


def test_train_step_takes_dtype(files, capsys, monkeypatch):
    import af3

    loaded = []
    real_load = af3.load
    monkeypatch.setattr(af3, "load", lambda *a, **k: loaded.append(k["dtype"]) or real_load(*a, **k))
    assert example("train_step").main([str(files / "a.wav"), "Hello.", "--checkpoint", str(files / "ckpt"),
                                       "--dtype", "bfloat16"]) == 0
    assert loaded == ["bfloat16"] and "loss before" in capsys.readouterr().out


def test_chat_seed_repeats_the_replies_and_says_how_to_end(files, capsys, monkeypatch):
    chat, args = example("chat"), [str(files / "a.wav"), "--checkpoint", str(files / "ckpt")]
    replies = []
    for seed in ("3", "3", "4"):
        monkeypatch.setattr(sys, "stdin", io.StringIO("What is it?\nAnd then?\n\n"))
        assert chat.main([*args, "--seed", seed]) == 0
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] != replies[2]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("\n"))
    assert chat.main(args) == 0
    assert "an empty line or Ctrl-D ends the chat" in capsys.readouterr().err


def test_errors_name_the_flag_to_change(files, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is it?\n\n"))
    assert example("chat").main([str(files / "a.wav"), "--checkpoint", str(files / "ckpt"), "--max-tokens", "40"]) == 1
    err = capsys.readouterr().err
    assert "--max-tokens" in err and "--max-new-tokens" in err and "start_chat(" not in err, err
    assert "max_new_tokens" not in err.replace("--max-new-tokens", "")
    assert example("transcribe").main([str(files / "a.wav"), str(files / "b.flac"), "--checkpoint", str(files / "ckpt"),
                                       "--max-new-tokens", "100000"]) == 2  # the exit status counts the failures
    err = capsys.readouterr().err
    assert err.count("lower --max-new-tokens") == 2, err


def test_a_failed_streamed_file_prints_no_empty_line(files, capsys, tmp_path):
    short = tmp_path / "short.wav"
    soundfile.write(str(short), np.zeros(200, dtype=np.float32), 16000)  # decodes, but gives no audio token
    assert example("transcribe").main([str(short), "--checkpoint", str(files / "ckpt")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "too short" in err and err.count(str(short)) == 1


def test_make_install_says_what_it_is_doing(tmp_path):
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # A dry run (-n) with a venv that does not exist lists every command install would run.
    run = subprocess.run(["make", "-n", "install", f"VENV={tmp_path / 'venv'}"], cwd=EXAMPLES.parent,
                         capture_output=True, text=True, timeout=60, check=True)
    lines = run.stdout.splitlines()
    big = next(i for i, line in enumerate(lines) if "pip install" in line and ".[test]" in line)
    said = " ".join(line for line in lines[:big] if line.startswith("echo"))
    assert "5.7 GB" in said and "torch" in said and "--quiet" not in lines[big]


def test_a_library_keyword_becomes_the_flag_once():
    # "device=" became "--device" and then, matched again inside it, "----device".
    common = example("_common")
    assert common.as_flags("CUDA is not available; use device='cpu'", ("--device",)) == \
        "CUDA is not available; use --device 'cpu'"
    assert common.as_flags("seed=3, then seed and dtype", ("--seed", "--dtype")) == "--seed 3, then --seed and --dtype"


@pytest.mark.parametrize("name, extra", [("chat", ["--seed", str(2**64)]), ("transcribe", ["--seed", str(-2**63 - 1)]),
                                         ("train_step", ["Hello.", "--lr", "inf"]),
                                         ("train_step", ["Hello.", "--dtype", "float16"])])
def test_seeds_out_of_range_non_finite_rates_and_float16_training_are_usage_errors(files, capsys, name, extra):
    # A 2**64 seed was a traceback (chat) or blamed on the audio file (transcribe); training at
    # lr inf or in float16 (no loss scaling) ended in nan with exit 0.
    with pytest.raises(SystemExit) as e:
        example(name).main([str(files / "a.wav"), *extra, "--checkpoint", str(files / "ckpt")])
    assert e.value.code == 2
    assert extra[-2] in capsys.readouterr().err


def test_a_bad_generation_config_names_its_file_not_a_flag(files, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(files / "ckpt", ckpt)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**gen, "max_new_tokens": -5}))
    assert example("transcribe").main([str(files / "a.wav"), "--checkpoint", str(ckpt)]) == 101
    err = capsys.readouterr().err
    assert f"generation config {ckpt / 'generation_config.json'}: max_new_tokens must be >= 1, got -5" in err, err
    assert "--max-new-tokens" not in err


def test_chat_names_a_clip_too_short_before_the_first_question(files, tmp_path, capsys, monkeypatch):
    soundfile.write(str(tmp_path / "few.wav"), np.zeros(100, dtype=np.float32), 16000)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no question asked
    assert example("chat").main([str(tmp_path / "few.wav"), "--checkpoint", str(files / "ckpt")]) == 1
    assert f"error: {tmp_path / 'few.wav'}: 100 samples is too short" in capsys.readouterr().err


def test_demo_with_a_file_in_the_way_says_so(tmp_path, capsys):
    (tmp_path / ".demo").write_text("mine")
    assert example("demo").main(tmp_path / ".demo") == 1
    assert "exists and is not a folder" in capsys.readouterr().err
    assert (tmp_path / ".demo").read_text() == "mine"


def test_transcribe_refuses_chunks_too_short_for_a_token_before_loading(files, capsys):
    assert example("transcribe").main([str(files / "a.wav"), "--checkpoint", str(files / "nope"),
                                       "--chunk-seconds", "0.01", "--margin-seconds", "0"]) == 101
    err = capsys.readouterr().err
    assert "--chunk-seconds - --margin-seconds must be more than 0.02 s" in err and "nope" not in err
