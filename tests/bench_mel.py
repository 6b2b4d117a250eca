"""Benchmark: 10 minutes of audio through af3's log-mel frontend vs HF's WhisperFeatureExtractor.

HF is called as AudioFlamingo3Processor calls it: on the 20 windows of 30 s, with the mask.
The two run interleaved in one process (HF, af3, HF, af3, ...) so that load from other processes
falls on both alike; best and median of each are printed.
Run: .venv/bin/python tests/bench_mel.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from af3.frontend import MAX_SAMPLES, N_MELS, SAMPLING_RATE
from af3.mel import extract_features
from af3.windows import window_ranges

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
    times: dict[str, list[float]] = {"hf": [], "af3": []}
    for _ in range(ROUNDS):
        for name, fn in (("hf", hf), ("af3", af3)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"10 min of audio (20 windows), torch threads {torch.get_num_threads()}, max |diff| {diff:.2e}, "
          f"{ROUNDS} interleaved rounds")
    print(f"HF WhisperFeatureExtractor: best {best['hf'] * 1e3:7.1f} ms  median {median['hf'] * 1e3:7.1f} ms")
    print(f"af3 extract_features:       best {best['af3'] * 1e3:7.1f} ms  median {median['af3'] * 1e3:7.1f} ms")
    print(f"speed-up (HF / af3): best {best['hf'] / best['af3']:.2f}x  median {median['hf'] / median['af3']:.2f}x")


if __name__ == "__main__":
    main()
