"""Benchmark: 10 minutes of audio through af3's log-mel frontend vs HF's WhisperFeatureExtractor.

HF is called as AudioFlamingo3Processor calls it: on the 20 windows of 30 s, with the mask.
The two run interleaved in one process (HF, af3, HF, af3, ...) so that load from other processes
falls on both alike; best and median of each are printed.
Run: .venv/bin/python tests/bench_mel.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from af3.frontend import MAX_SAMPLES, N_MELS, SAMPLING_RATE
from af3.mel import extract_features
from af3.windows import window_ranges
from tests.timing import best, interleaved, median

ROUNDS = 11


def main() -> None:
    audio = (0.1 * np.random.default_rng(0).standard_normal(MAX_SAMPLES)).astype(np.float32)
    clip = torch.from_numpy(audio)
    windows = [audio[start:end] for start, end in window_ranges(len(audio))]  # 20 x 30 s
    extractor = WhisperFeatureExtractor(feature_size=N_MELS)

    def hf() -> torch.Tensor:
        return extractor(windows, sampling_rate=SAMPLING_RATE, return_attention_mask=True,
                         return_tensors="pt")["input_features"]

    def af3() -> torch.Tensor:
        return extract_features([clip]).input_features

    diff = (hf() - af3()).abs().max().item()  # also the warm-up: caches, allocator, thread pool
    times = interleaved({"hf": hf, "af3": af3}, ROUNDS, warm_up=False)
    fast, mid = best(times), median(times)
    print(f"10 min of audio (20 windows), torch threads {torch.get_num_threads()}, max |diff| {diff:.2e}, "
          f"{ROUNDS} interleaved rounds")
    print(f"HF WhisperFeatureExtractor: best {fast['hf'] * 1e3:7.1f} ms  median {mid['hf'] * 1e3:7.1f} ms")
    print(f"af3 extract_features:       best {fast['af3'] * 1e3:7.1f} ms  median {mid['af3'] * 1e3:7.1f} ms")
    print(f"speed-up (HF / af3): best {fast['hf'] / fast['af3']:.2f}x  median {mid['hf'] / mid['af3']:.2f}x")


if __name__ == "__main__":
    main()
