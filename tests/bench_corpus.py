"""Corpus and long-recording speed on the tiny random checkpoint, greedy, 2 threads.

    .venv/bin/python tests/bench_corpus.py [--hour-only | --corpus-only]

1. Clips per second on 64 generated clips of 1 to 60 s (a manifest of wav files, run through
   af3.corpus.transcribe_corpus): length-sorted batches of 8, manifest-order batches of 8, one clip
   at a time, and transformers' `generate` one clip at a time (inputs from af3's processor: the
   tiny checkpoint has no chat template for HF's). Modes are interleaved, best of 2 rounds.
   af3 cuts a 45 s clip into two chunks where HF runs it as one 2-window prompt; the audio is the same.
   Then two more passes of each side timed by stage (audio in, encoder and its attention, the rest),
   and the bound on the ratio: af3's encoder run on every window alone at its own valid length
   (the least encoder work parity allows, with the SDPA kernel HF calls) against HF's time / 3.
2. A 1-hour recording end to end (`m.transcribe(path)`, 30 s chunks, batches of 8), in a fresh
   process: wall time, and peak RSS over the RSS after `import af3` (target: under 1.5 GB).
"""

from __future__ import annotations

import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

N_CLIPS, BATCH, NEW_TOKENS, THREADS = 64, 8, 16, 2
GREEDY = {"do_sample": False, "max_new_tokens": NEW_TOKENS}


def build(root: Path) -> None:
    from tests.tiny_checkpoint import write_tiny_af3_checkpoint

    # 4096 positions: a 60 s clip is 1500 audio tokens in HF's single prompt.
    write_tiny_af3_checkpoint(root, max_new_tokens=NEW_TOKENS, max_position_embeddings=4096)


def bench_corpus(root: Path) -> None:
    from transformers import AudioFlamingo3ForConditionalGeneration

    import af3
    from af3.corpus import read_manifest, transcribe_corpus

    rng = np.random.default_rng(0)
    seconds = rng.uniform(1, 60, N_CLIPS)
    paths = []
    for i, s in enumerate(seconds):
        path = root / f"clip{i:02d}.wav"
        soundfile.write(str(path), (0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32), 16000)
        paths.append(str(path))
    manifest = root / "manifest.txt"
    manifest.write_text("\n".join(paths) + "\n")
    m = af3.load(root / "ckpt")
    hf = AudioFlamingo3ForConditionalGeneration.from_pretrained(root / "hf").eval()
    settings = {"eos_token_id": m.generation_config.eos_token_id, "pad_token_id": m.generation_config.pad_token_id,
                "repetition_penalty": m.generation_config.repetition_penalty}

    def corpus(sort: bool, batch: int):
        def run() -> None:
            out = root / f"out-{sort}-{batch}.jsonl"
            out.unlink(missing_ok=True)
            transcribe_corpus(m, manifest, out, batch_size=batch, sort=sort, log=io.StringIO(), **GREEDY)
        return run

    def hf_loop() -> None:
        for item in read_manifest(manifest):
            inputs = m.processor.apply_transcription_request(item.audio)
            with torch.inference_mode():
                hf.generate(**inputs, **GREEDY, **settings)

    modes = {"sorted batches of 8": corpus(True, BATCH), "manifest order, batches of 8": corpus(False, BATCH),
             "one at a time": corpus(True, 1), "HF one at a time": hf_loop}
    best = dict.fromkeys(modes, float("inf"))
    for _ in range(2):
        for name, fn in modes.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"{N_CLIPS} clips of 1-60 s ({seconds.sum():.0f} s of audio), tiny model, greedy, {NEW_TOKENS} new tokens, "
          f"threads={torch.get_num_threads()}, best of 2 interleaved rounds")
    for name, t in best.items():
        print(f"  {name:30s} {N_CLIPS / t:6.2f} clips/s  ({t:.1f} s)")
    ratio = best["HF one at a time"] / best["sorted batches of 8"]
    print(f"  sorted batches vs HF one at a time: {ratio:.2f}x (target >= 3x); "
          f"vs manifest order: {best['manifest order, batches of 8'] / best['sorted batches of 8']:.2f}x")
    # The same answers whichever way they were batched.
    texts = [[json.loads(line)["text"] for line in (root / f"out-{s}-{b}.jsonl").read_text().splitlines()]
             for s, b in ((True, BATCH), (False, BATCH), (True, 1))]
    print(f"  outputs equal across batchings: {texts[0] == texts[1] == texts[2]}")
    stages_and_bound(m, hf, modes["sorted batches of 8"], hf_loop)


def stages_and_bound(m, hf, af3_sorted, hf_loop) -> None:
    """Where each side's time goes (one more timed pass of each), and the least time af3's encoder
    can take: every window alone at its own valid length (no padding, no mask, same kernels)."""
    import torch.nn.functional as F

    spent: dict[str, float] = {}
    inside: list[str] = []
    encoder_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def timed(obj, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def wrapper(*args, **kwargs):
            inside.append(key)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - start
                inside.pop()
        setattr(obj, name, wrapper)

    sdpa = F.scaled_dot_product_attention

    def timed_sdpa(*args, **kwargs):
        start = time.perf_counter()
        out = sdpa(*args, **kwargs)
        if inside and inside[-1] == "encoder":
            spent["encoder attention"] = spent.get("encoder attention", 0.0) + time.perf_counter() - start
        return out

    encode = m.model.encoder.forward
    timed(m.processor, "apply_transcription_request", "read + log-mel + tokens")
    timed(m.model.encoder, "forward", "encoder")
    timed(hf.model.audio_tower, "forward", "encoder")
    F.scaled_dot_product_attention = timed_sdpa
    try:
        stages: dict[str, tuple[float, dict[str, float]]] = {}
        for _ in range(2):  # interleaved; each side's faster pass is kept
            for name, fn in (("af3 sorted batches of 8", af3_sorted), ("HF one at a time", hf_loop)):
                spent.clear()
                start = time.perf_counter()
                fn()
                total = time.perf_counter() - start
                if name not in stages or total < stages[name][0]:
                    stages[name] = (total, dict(spent))
        # The floor: af3's encoder on the sorted run's windows, each alone at its own valid length.
        m.model.encoder.forward = lambda features, lengths: encoder_inputs.append((features, lengths)) or \
            encode(features, lengths)
        af3_sorted()
        m.model.encoder.forward = encode
        timed(m.model.encoder, "forward", "encoder")
        floor: dict[str, float] = {}
        for _ in range(2):
            spent.clear()
            with torch.inference_mode():
                for features, lengths in encoder_inputs:
                    for i in range(features.shape[0]):
                        m.model.encoder(features[i:i + 1], lengths[i:i + 1])
            if not floor or spent["encoder"] < floor["encoder"]:
                floor = dict(spent)
    finally:
        F.scaled_dot_product_attention = sdpa
        m.model.encoder.forward = encode
    print("  where the time goes (two more passes of each, timed by stage, the faster kept; HF's inputs come from "
          "af3's processor):")
    print(f"    {'':40s} {'af3 sorted batches of 8':>24s} {'HF one at a time':>24s}")
    rows = {}
    for name, (total, parts) in stages.items():
        other = total - parts.get("read + log-mel + tokens", 0.0) - parts.get("encoder", 0.0)
        rows[name] = {"audio: read, log-mel, prompt ids": parts.get("read + log-mel + tokens", 0.0),
                      "audio encoder": parts.get("encoder", 0.0),
                      "  of which attention (SDPA)": parts.get("encoder attention", 0.0),
                      "decoder, generation (af3: and reading)": other, "total": total}
    for row in rows["HF one at a time"]:
        cells = [f"{rows[n][row]:6.2f} s ({100 * rows[n][row] / stages[n][0]:3.0f}%)" for n in stages]
        print(f"    {row:40s} {cells[0]:>24s} {cells[1]:>24s}")
    af3_total, af3_parts = stages["af3 sorted batches of 8"]
    hf_total = stages["HF one at a time"][0]
    budget, others = hf_total / 3, af3_total - af3_parts["encoder"]
    n_windows = sum(features.shape[0] for features, _ in encoder_inputs)
    reach = hf_total / (floor["encoder"] + others)
    print(f"  bound: 3x HF needs af3 within HF / 3 = {budget:.2f} s. af3's encoder alone on exactly the valid "
          f"positions of each of the {n_windows} windows (one at a time: no padding, no mask, the SDPA kernel HF "
          f"calls) takes {floor['encoder']:.2f} s ({floor.get('encoder attention', 0.0):.2f} s of it attention), "
          f"{100 * floor['encoder'] / budget:.0f}% of that budget. That leaves {budget - floor['encoder']:.2f} s for "
          f"reading, log-mel and decoding, which take {others:.2f} s now: with the encoder at that floor and the "
          f"other stages as they are, af3 reaches {reach:.2f}x HF.")


HOUR = """
import sys, time
sys.path.insert(0, {repo!r})


def rss(field):  # VmHWM (peak) and VmRSS of this process; unlike ru_maxrss, not carried over from the parent
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


import torch
torch.set_num_threads({threads})
import af3
base = rss("VmRSS")
m = af3.load({ckpt!r})
start = time.perf_counter()
segments = m.transcribe_segments({wav!r}, batch_size={batch}, do_sample=False, max_new_tokens={new}, progress=False)
wall = time.perf_counter() - start
peak = rss("VmHWM")
print(f"  1-hour recording: {{len(segments)}} chunks, {{wall:.1f}} s wall ({{3600 / wall:.0f}}x real time); "
      f"peak RSS {{peak / 1e9:.2f}} GB, {{(peak - base) / 1e9:.2f}} GB over the post-import baseline "
      f"({{base / 1e9:.2f}} GB) (target < 1.5 GB)")
"""


def bench_hour(root: Path) -> None:
    wav = root / "hour.wav"
    rng = np.random.default_rng(1)
    with soundfile.SoundFile(str(wav), "w", 16000, 1, subtype="PCM_16") as f:  # written a minute at a time
        for _ in range(60):
            f.write((0.1 * rng.standard_normal(16000 * 60)).astype(np.float32))
    code = HOUR.format(repo=str(REPO), threads=THREADS, ckpt=str(root / "ckpt"), wav=str(wav), batch=BATCH,
                       new=NEW_TOKENS)
    print("1 hour of 16 kHz noise, 30 s chunks, batches of 8, in a fresh process:")
    subprocess.run([sys.executable, "-c", code], check=True)


def main() -> None:
    torch.set_num_threads(THREADS)
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root)
        if which != "--hour-only":
            bench_corpus(root)
        if which != "--corpus-only":
            bench_hour(root)
    print(f"(this process's peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB)")


if __name__ == "__main__":
    main()
