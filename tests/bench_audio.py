"""Benchmark: af3.audio.load_audio (block-by-block decoding) vs decoding the whole file at once.

    .venv/bin/python tests/bench_audio.py

"whole" is what load_audio did before it decoded in blocks: read every frame, downmix, check for
NaN / inf, resample once. Both run interleaved in this process on the same files (written to a temporary folder);
the best of 5 runs is printed, with the ratio.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from af3.audio import load_audio
from af3.frontend import SAMPLING_RATE
from tests.timing import best, interleaved

CASES = [("30 s, 16 kHz mono", 16_000, 1, 30), ("30 s, 44.1 kHz stereo", 44_100, 2, 30),
         ("5 min, 48 kHz mono", 48_000, 1, 300), ("10 min, 44.1 kHz stereo", 44_100, 2, 600)]


def whole(path: Path) -> torch.Tensor:
    data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    mono = torch.from_numpy(data).mean(dim=1)
    assert bool(torch.isfinite(mono).all())  # load_audio checks every sample too
    return mono if rate == SAMPLING_RATE else torchaudio.functional.resample(mono, rate, SAMPLING_RATE)


def main() -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, rate, channels, seconds in CASES:
            path = Path(tmp) / f"{rate}-{channels}-{seconds}.flac"
            soundfile.write(path, (rng.standard_normal((rate * seconds, channels)) * 0.1).astype(np.float32),
                            rate, subtype="PCM_16")
            t = best(interleaved({"blocks": lambda p=path: load_audio(p), "whole": lambda p=path: whole(p)}, 5,
                                 warm_up=False))
            diff = float((load_audio(path) - whole(path)).abs().max())
            print(f"{name:26s} load_audio {t['blocks'] * 1e3:7.0f} ms   whole file {t['whole'] * 1e3:7.0f} ms   "
                  f"ratio {t['blocks'] / t['whole']:.2f}   max |difference| {diff:.1e}")


if __name__ == "__main__":
    main()
