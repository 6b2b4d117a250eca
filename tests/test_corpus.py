"""Corpora: manifests, shares balanced by duration, resumable output with failure records, and a
two-process torchrun run (gloo on CPU) that must equal a single-process run."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import af3
from af3.corpus import Item, part_path, read_manifest, shares, transcribe_corpus

REPO = Path(__file__).resolve().parent.parent
RUN = {"chunk_seconds": 8.0, "margin_seconds": 1.0, "batch_size": 3, "do_sample": False}
CLI = ["--chunk-seconds", "8", "--margin-seconds", "1", "--batch-size", "3", "--greedy"]
LENGTHS = (1.0, 9.5, 0.6, 2.5, 1.2)  # one longer than an 8 s chunk


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tests.tiny_checkpoint import write_tiny_af3_checkpoint

    root = tmp_path_factory.mktemp("corpus")
    write_tiny_af3_checkpoint(root, max_new_tokens=3)
    rng = np.random.default_rng(0)
    names = []
    for i, seconds in enumerate(LENGTHS):
        name = f"clip{i}.{'flac' if i % 2 else 'wav'}"
        soundfile.write(str(root / name), (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32),
                        16000)
        names.append(str(root / name))
    (root / "broken.wav").write_bytes(b"RIFF not really a wav file")
    lines = [*names[:3], str(root / "missing.wav"), *names[3:],
             json.dumps({"audio": names[0], "id": "again", "prompt": "What is said?"}), str(root / "broken.wav")]
    (root / "manifest.txt").write_text("\n".join(lines[:4]) + "\n\n" + "\n".join(lines[4:]) + "\n")
    return root, af3.load(root / "ckpt")


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_read_manifest_paths_and_json_lines(tmp_path):
    m = tmp_path / "m.txt"
    m.write_text('a.wav\n\n{"audio": "b.flac", "prompt": "Say it.", "id": 7}\n  c.mp3  \n')
    assert read_manifest(m) == [Item(0, "a.wav"), Item(1, "b.flac", "Say it.", "7"), Item(2, "c.mp3")]
    for text, message in (('{"audio": "a.wav"', "line 1: not valid JSON"),
                          ('{"path": "a.wav"}', 'line 1: a JSON line needs "audio"'),
                          ('a.wav\n{"audio": "a.wav", "prompt": 3}', 'line 2: "prompt" must be a string'),
                          ("\n\n", "the manifest lists no audio")):
        m.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_manifest(m)
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "nope.txt")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 3600), max_size=40), st.integers(1, 6))
def test_shares_split_every_item_once_balanced_by_duration(seconds, n):
    split = shares(seconds, n)
    assert sorted(i for share in split for i in share) == list(range(len(seconds)))
    totals = [sum(seconds[i] for i in share) for share in split]
    assert max(totals) - min(totals) <= max(seconds, default=0) + 1e-6


def test_corpus_output_in_manifest_order_with_failure_records(corpus, tmp_path):
    root, m = corpus
    out = tmp_path / "results.jsonl"
    log = io.StringIO()
    assert transcribe_corpus(m, root / "manifest.txt", out, log=log, **RUN) == 2  # missing + broken
    items = read_manifest(root / "manifest.txt")
    rows = records(out)
    assert [r["index"] for r in rows] == list(range(len(items)))
    assert [r["audio"] for r in rows] == [it.audio for it in items]
    assert not list(tmp_path.glob("results.jsonl.part*"))  # merged, parts removed
    for row, item in zip(rows, items):
        if "missing" in item.audio:
            assert row["error"].startswith("FileNotFoundError: audio file not found")
        elif "broken" in item.audio:
            assert row["error"].startswith("AudioError: ") and "could not decode audio" in row["error"]
        else:  # the same text as transcribing the file on its own
            assert row["text"] == m.transcribe(item.audio, item.prompt, chunk_seconds=8, margin_seconds=1,
                                               do_sample=False)
            assert row["segments"][-1]["end"] == pytest.approx(soundfile.info(item.audio).duration, abs=1e-3)
    assert rows[-2]["id"] == "again" and rows[-2]["prompt"] == "What is said?" and rows[0]["id"] == items[0].audio
    assert len(rows[1]["segments"]) == 2  # 9.5 s in chunks of at most 8 s
    # Manifest-order batches give the same results.
    out2 = tmp_path / "unsorted.jsonl"
    assert transcribe_corpus(m, root / "manifest.txt", out2, sort=False, log=log, **RUN) == 2
    assert out2.read_text() == out.read_text()


def test_corpus_resumes_where_a_killed_run_stopped(corpus, tmp_path):
    root, m = corpus
    manifest = tmp_path / "m.txt"
    manifest.write_text((root / "manifest.txt").read_text().replace(str(root / "missing.wav"),
                                                                      str(tmp_path / "late.wav")))
    full = tmp_path / "full.jsonl"
    transcribe_corpus(m, manifest, full, log=io.StringIO(), **RUN)
    out = tmp_path / "out.jsonl"

    def killed(record):
        if len(records(part_path(out, 0))) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match="^$"):  # raised bare by the hook
        transcribe_corpus(m, manifest, out, log=io.StringIO(), after_record=killed, **RUN)
    assert not out.exists() and len(records(part_path(out, 0))) == 3  # flushed as they finished
    with open(part_path(out, 0), "a") as f:
        f.write('{"index": 4, "audio": "half a li')  # a line cut off by the kill
    log = io.StringIO()
    assert transcribe_corpus(m, manifest, out, log=log, **RUN) == 2
    assert "rank 0/1: 5 to do" in log.getvalue() and "(3 of 8 done before)" in log.getvalue()
    assert out.read_text() == full.read_text()
    # Failures are retried: once the missing file exists, a rerun transcribes only it (and the broken one).
    soundfile.write(str(tmp_path / "late.wav"), np.zeros(8000, np.float32), 16000)
    log = io.StringIO()
    assert transcribe_corpus(m, manifest, out, log=log, **RUN) == 1
    assert "2 to do" in log.getvalue()
    rows = records(out)
    assert "text" in rows[3] and [r for r in rows if "error" in r] == [records(full)[-1]]
    assert [r for i, r in enumerate(rows) if i != 3] == [r for i, r in enumerate(records(full)) if i != 3]


def test_corpus_refuses_outputs_it_would_clobber(corpus, tmp_path):
    root, m = corpus
    other = tmp_path / "notes.jsonl"
    other.write_text("my own notes\n")
    with pytest.raises(ValueError, match="not a JSON record; --output names an existing file"):
        transcribe_corpus(m, root / "manifest.txt", other, log=io.StringIO(), **RUN)
    assert other.read_text() == "my own notes\n"
    # JSON lines that are not this manifest's results: a fine-tuning manifest, another corpus's
    # results. The run would rewrite the file with its own records; it refuses and leaves it.
    for text in ('{"messages": [{"role": "user", "content": "hi"}]}\n',
                 '{"index": 0, "id": "x", "audio": "elsewhere.wav", "text": "hello"}\n',
                 '{"index": 99, "id": "x", "audio": "a.wav", "text": "hello"}\n'):
        other.write_text(text)
        with pytest.raises(ValueError, match="line 1: not a result of this manifest's entry"):
            transcribe_corpus(m, root / "manifest.txt", other, log=io.StringIO(), **RUN)
        assert other.read_text() == text
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, error, says in ((tmp_path, IsADirectoryError, "is a folder; name a file"),
                             (a_file / "r.jsonl", NotADirectoryError, f"{a_file} is not a folder"),
                             (tmp_path / "nope" / "r.jsonl", FileNotFoundError, "does not exist")):
        with pytest.raises(error, match=f"output {re.escape(str(out))}.*{re.escape(says)}"):
            transcribe_corpus(m, root / "manifest.txt", out, log=io.StringIO(), **RUN)
    with pytest.raises(ValueError, match="is the manifest itself"):
        transcribe_corpus(m, root / "manifest.txt", root / "manifest.txt", log=io.StringIO(), **RUN)
    with pytest.raises(ValueError, match="unknown generation argument"):
        transcribe_corpus(m, root / "manifest.txt", tmp_path / "x.jsonl", log=io.StringIO(), temprature=0.5)


CRASHING = """
import os, runpy, sys
import af3.corpus

real = af3.corpus.transcribe_corpus

def crash_on_rank_0(*args, **kwargs):
    def after(record):
        if os.environ["RANK"] == "0":
            os._exit(3)  # killed after its first record is flushed
    return real(*args, after_record=after, **kwargs)

af3.corpus.transcribe_corpus = crash_on_rank_0
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def torchrun(*args: str) -> subprocess.CompletedProcess:
    # On the CPUs with gloo, also on a machine with a GPU (two processes would need two GPUs).
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], check=False, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes_equal_one_and_resume_after_a_killed_rank(corpus, tmp_path):
    root, m = corpus
    single = tmp_path / "single.jsonl"
    transcribe_corpus(m, root / "manifest.txt", single, log=io.StringIO(), **RUN)
    out = tmp_path / "out.jsonl"
    wrapper = tmp_path / "crash.py"
    wrapper.write_text(CRASHING)
    cli = [str(REPO / "examples" / "transcribe.py"), "--manifest", str(root / "manifest.txt"), "--output", str(out),
           "--checkpoint", str(root / "ckpt"), *CLI]
    crashed = torchrun(str(wrapper), *cli)
    assert crashed.returncode != 0 and not out.exists(), crashed.stderr[-3000:]
    done_before = [r for p in tmp_path.glob("out.jsonl.part*") for r in records(p) if "error" not in r]
    # Rank 0's share is the longest clip and the short good ones (it writes one record, a success, and
    # dies); rank 1's the two bad files, each weighed as one chunk since their length is unknown.
    assert len(records(Path(f"{out}.part0"))) == 1 and done_before, crashed.stderr[-3000:]
    rerun = torchrun(*cli)
    # Exit statuses: rank 0 exits with the failure count (2), which torchrun reports as a failure.
    assert rerun.returncode != 0 and "2 recording(s) failed" in rerun.stderr, rerun.stderr[-3000:]
    # Searched for anywhere, not at line starts: both ranks and torch write to one stderr, and a line
    # written without its newline (print writes the newline apart under PYTHONUNBUFFERED, set on these
    # machines) lets another line land after it; a CI run once found a rank's line so. Each rank's
    # line is one write (af3/corpus.py), so it stays whole.
    to_do = dict(re.findall(r"rank (\d)/2: (\d+) to do", rerun.stderr))
    assert to_do.keys() == {"0", "1"}, rerun.stderr[-3000:]
    assert sum(map(int, to_do.values())) == 8 - len(done_before)  # only what was missing
    assert f"({len(done_before)} of 8 done before)" in rerun.stderr
    assert out.read_text() == single.read_text()
    assert not list(tmp_path.glob("out.jsonl.part*"))


GROUP_LIFETIME = """
import os, torch, torch.distributed as dist
from af3.corpus import init_distributed
init_distributed("cpu")
with torch.device("meta"):  # as af3.load builds its model: this imports torch._dynamo
    torch.nn.Embedding(4, 4)
dist.all_reduce(torch.ones(1))
dist.barrier()
dist.destroy_process_group()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(f"gloo threads left: {sum('gloo' in n for n in names)}", flush=True)  # one write
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_destroying_the_group_ends_its_threads(tmp_path):
    """Under torchrun, destroy_process_group ends gloo's threads even when the model is built after
    the group is made. If they outlive it, they can abort the process's exit (SIGABRT, "terminate
    called without an active exception") as they free the last collectives' tensors."""
    script = tmp_path / "group.py"
    script.write_text(GROUP_LIFETIME)
    run = torchrun(str(script))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("gloo threads left: 0") == 2, run.stdout + run.stderr[-3000:]


@pytest.mark.parametrize("device, gpus, local_rank, expected", [
    (None, 0, 1, ("gloo", "cpu")),
    (None, 2, 1, ("nccl", "cuda:1")),  # this rank's GPU
    ("cuda", 2, 1, ("nccl", "cuda:1")),
    ("cpu", 2, 1, ("gloo", "cpu")),  # the user's choice, though there are GPUs
    (None, 1, 1, "this node has 1 GPU"),  # two processes, one GPU: said, before joining any group
])
def test_init_distributed_picks_the_backend_for_the_device(monkeypatch, device, gpus, local_rank, expected):
    import af3.corpus

    joined, current = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(af3.corpus.dist, "init_process_group", lambda backend, **kw: joined.append(backend))
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            af3.corpus.init_distributed(device)
        assert not joined
        return
    got = af3.corpus.init_distributed(device)
    assert (joined, str(got)) == ([expected[0]], expected[1])
    assert current == ([got] if got.type == "cuda" else [])
