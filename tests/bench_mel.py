"""Benchmark: 10 minutes of audio through af3's log-mel frontend vs HF's WhisperFeatureExtractor.

HF is called as AudioFlamingo3Processor calls it: on the 20 windows of 30 s, with the mask.
Run: .venv/bin/python tests/bench_mel.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from af3.config import FrontendConfig
from af3.mel import extract_features
from af3.windows import window_ranges

REPEATS = 5


def best_and_median(fn) -> tuple[float, float]:
    fn()  # warm-up: caches, allocator, thread pool
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    frontend = FrontendConfig()
    audio = (0.1 * np.random.default_rng(0).standard_normal(frontend.max_samples)).astype(np.float32)
    clip = torch.from_numpy(audio)
    windows = [audio[start:end] for start, end in window_ranges(len(audio))]  # 20 x 30 s
    extractor = WhisperFeatureExtractor(feature_size=frontend.num_mel_bins)

    def hf() -> torch.Tensor:
        return extractor(windows, sampling_rate=frontend.sampling_rate, return_attention_mask=True,
                         return_tensors="pt")["input_features"]

    def af3() -> torch.Tensor:
        return extract_features([clip], frontend).input_features

    diff = (hf() - af3()).abs().max().item()
    hf_best, hf_med = best_and_median(hf)
    af3_best, af3_med = best_and_median(af3)
    print(f"10 min of audio (20 windows), torch threads {torch.get_num_threads()}, max |diff| {diff:.2e}")
    print(f"HF WhisperFeatureExtractor: best {hf_best * 1e3:7.1f} ms  median {hf_med * 1e3:7.1f} ms")
    print(f"af3 extract_features:       best {af3_best * 1e3:7.1f} ms  median {af3_med * 1e3:7.1f} ms")
    print(f"speed-up (HF / af3, median): {hf_med / af3_med:.2f}x")


if __name__ == "__main__":
    main()
