"""GPU benchmark at the real model's dimensions (random weights): decode tokens/s and the encoder.

    .venv/bin/python tests/bench_gpu.py [--steps 64] [--prompt 512] [--no-compile]

AF3's full size (`AF3Config()`: Qwen2.5-7B decoder, Whisper-large-v3 encoder, 8.3 B parameters,
16.6 GB in bf16), weights drawn at random on the GPU. Prints, for bf16 decoding at batch 1:
tokens/s eager and with compile=True (CUDA graphs), each as a percentage of the HBM floor
(bytes of weights read per token / read bandwidth measured here by summing a 4 GiB tensor);
and the encoder's time per 30 s window (batches of 1 and 8 windows). Needs a CUDA GPU with
about 20 GB free; on a machine without one it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from af3.config import AF3Config
from af3.generation import compiled_decode_one_token, decode_one_token
from af3.model import AudioFlamingo3


def cuda_time(fn, repeats: int) -> float:
    """Best seconds per call of fn() over `repeats`, timed with CUDA events."""
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def hbm_read_bandwidth(device: torch.device) -> float:
    x = torch.ones(2**30, dtype=torch.float32, device=device)  # 4 GiB
    return 2**32 / cuda_time(x.sum, 5)


def random_model(device: torch.device, dtype: torch.dtype) -> AudioFlamingo3:
    with torch.device("meta"):
        model = AudioFlamingo3(AF3Config())
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.to(dtype).eval()


def decode_bytes_per_token(model: AudioFlamingo3) -> int:
    """Weights one decode step reads: every decoder tensor but the embedding (one row of it)."""
    return sum(p.numel() * p.element_size() for name, p in model.decoder.named_parameters()
               if not name.startswith("embed_tokens"))


def decode_seconds_per_token(model: AudioFlamingo3, step, prompt: int, steps: int) -> float:
    device = model.decoder.embed_tokens.weight.device
    cache = model.new_cache(1, prompt + steps)
    with torch.inference_mode():
        ids = torch.randint(0, model.config.audio_token_id, (1, prompt), device=device)  # text only
        model(ids, cache=cache)
        mask = torch.ones(1, prompt + steps, dtype=torch.long, device=device)
        slots = [torch.tensor([prompt + i], device=device) for i in range(steps)]

        def run():
            token = torch.zeros(1, 1, dtype=torch.long, device=device)
            for i in range(steps):
                token = step(model, token, mask, cache, slots[i], slots[i][None]).argmax(-1, keepdim=True)

        run()  # warm-up (and, compiled, the compilation and graph capture)
        return cuda_time(run, 3) / steps


def encoder_seconds_per_window(model: AudioFlamingo3, n_windows: int) -> float:
    device = model.encoder.conv1.weight.device
    features = torch.randn(n_windows, 128, 3000, device=device, dtype=model.encoder.conv1.weight.dtype)
    lengths = torch.full((n_windows,), 3000, device=device)
    with torch.inference_mode():
        model.encoder(features, lengths)  # warm-up
        return cuda_time(lambda: model.encoder(features, lengths), 3) / n_windows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=64, help="decode steps timed (default 64)")
    p.add_argument("--prompt", type=int, default=512, help="tokens in the cache before decoding (default 512)")
    p.add_argument("--no-compile", action="store_true", help="eager decoding only")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here; nothing measured")
        return 0
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    bandwidth = hbm_read_bandwidth(device)
    model = random_model(device, torch.bfloat16)
    floor = decode_bytes_per_token(model) / bandwidth
    print(f"HBM read bandwidth {bandwidth / 1e9:.0f} GB/s; bf16 decoder weights {decode_bytes_per_token(model) / 1e9:.1f} "
          f"GB/token -> floor {floor * 1e3:.2f} ms/token ({1 / floor:.0f} tokens/s)")
    steps = [("eager", decode_one_token)]
    if not args.no_compile:
        steps.append(("compiled", compiled_decode_one_token(model, device)))
    for name, step in steps:
        seconds = decode_seconds_per_token(model, step, args.prompt, args.steps)
        print(f"bf16 decode, {name:8s}: {1 / seconds:7.1f} tokens/s ({seconds * 1e3:.2f} ms/token, "
              f"{100 * floor / seconds:.0f}% of the HBM floor)")
    for n in (1, 8):
        print(f"encoder, batch of {n} window(s): {encoder_seconds_per_window(model, n) * 1e3:.1f} ms per 30 s window")
    return 0


if __name__ == "__main__":
    sys.exit(main())
