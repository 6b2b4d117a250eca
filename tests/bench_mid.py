"""Decode speed against the memory-bandwidth floor, at a "mid" size, af3 vs transformers (same run).

    .venv/bin/python tests/bench_mid.py [--steps 16] [--dtypes float32,bfloat16] [--no-compile]

The model: Qwen2.5-0.5B's decoder dimensions (hidden 896, 24 layers, 14 query / 2 key-value
heads, MLP 4864, vocabulary 151 936, untied head as in AF3) and a 4-layer encoder of
Whisper-large-v3's width, random weights, shared by both implementations (af3's parameters are
the HF model's tensors). A decode step at this size is bound by reading the weights: the floor
is (bytes of weights read per token) / (read bandwidth, measured by summing a 1 GiB tensor just
before each timed run: this machine's memory speed changes from minute to minute), and the
bench prints each run's ms/token as a percentage of its floor (100% = as fast as reading the
weights once), best run first. Batch 1, a 64-token text prompt, greedy; af3 eager and with its
decode step compiled (`compile=True`), HF eager. Then each kind of product alone, for the MLP's
up and down weights (896 and 4864 wide sums), against the bandwidth measured just before.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.nn.functional as F

from af3.generation import compiled_decode_one_token, decode_one_token
from af3.model import AudioFlamingo3
from af3.qwen2 import linear
from tests.model_helpers import af3_model_sharing, tiny_hf_config
from tests.timing import best_of

MID_TEXT = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
            "rope_theta": 1e6, "tie_word_embeddings": False}
MID_AUDIO = {"d_model": 1280, "encoder_layers": 4, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120}
PROMPT = 64


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes per second this machine reads, summing a 1 GiB fp32 tensor (best of `repeats`)."""
    x = torch.ones(2**28)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * x.element_size() / best


def bytes_per_token(model: AudioFlamingo3) -> int:
    """Weights a decode step reads: every decoder tensor but the embedding (one row of it)."""
    return sum(p.numel() * p.element_size() for name, p in model.decoder.named_parameters()
               if not name.startswith("embed_tokens"))


def build():
    from transformers import AudioFlamingo3ForConditionalGeneration

    torch.manual_seed(0)
    hf = AudioFlamingo3ForConditionalGeneration(tiny_hf_config(audio=MID_AUDIO, **MID_TEXT)).float().eval()
    return hf, af3_model_sharing(hf)  # the same tensors but the merged q/k/v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled af3 row")
    args = p.parse_args()
    hf, ours = build()
    ids = torch.randint(10, 150000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    print(f"mid model: {sum(p.numel() for p in ours.decoder.parameters()) / 1e6:.0f} M decoder parameters; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} decode steps, batch 1")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        hf.to(dtype)
        ours.to(dtype)
        floor_bytes = bytes_per_token(ours)
        rounds = measure(hf, ours, ids, args.steps, not args.no_compile)
        bws = [bw for runs in rounds.values() for _, bw in runs]
        print(f"{dtype_name:9s} weights read/token {floor_bytes / 1e9:.2f} GB; read bandwidth, measured before "
              f"each timed run: {min(bws) / 1e9:.1f}-{max(bws) / 1e9:.1f} GB/s -> floor "
              f"{floor_bytes / max(bws) * 1e3:.0f}-{floor_bytes / min(bws) * 1e3:.0f} ms/token")
        t_hf = min(t for t, _ in rounds["HF"])
        for name, runs in rounds.items():
            shares = [100 * floor_bytes / bw / t for t, bw in runs]  # each run against its own bandwidth
            t = min(t for t, _ in runs)
            print(f"{'':9s} {name:18s} {t * 1e3:6.1f} ms/token (best), {max(shares):3.0f}% of the floor "
                  f"(best run; runs: {', '.join(f'{x:.0f}' for x in shares)})"
                  + ("" if name == "HF" else f"  HF/af3 {t_hf / t:.2f}x"))
        for name in ("up", "down"):
            print(f"{'':9s} mlp.{name} products alone (24 matrices):")
            products_alone([getattr(layer.mlp, name) for layer in ours.decoder.layers], compile=not args.no_compile)


class _Products(torch.nn.Module):
    """F.linear with each of `layers`' weights (the same tensors, no copy) on one input: the
    module inductor freezes."""

    def __init__(self, layers: list[torch.nn.Linear]):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [F.linear(x, layer.weight) for layer in self.layers]


@torch.inference_mode()
def products_alone(layers: list[torch.nn.Linear], compile: bool, rounds: int = 3) -> None:
    """How fast one token's product reads the weights, each kernel alone: one call per matrix
    over `layers` in turn (24 of them, more than the caches hold), against the read bandwidth
    measured just before in the same round (the machine's memory speed changes from minute to
    minute). torch's F.linear, af3's linear (eager: split across threads in fp32), the product
    compile=True runs (inductor's multiply-and-sum) and, for bf16, F.linear compiled with the
    weights frozen, where inductor hands it to oneDNN with the weights prepacked for the CPU's
    bf16 dot-product instructions (the fastest one-row bf16 kernel found here; af3 does not use
    it, as it keeps a second, packed copy of every weight)."""
    x = torch.randn(1, 1, layers[0].in_features, dtype=layers[0].weight.dtype)
    nbytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers)
    kernels = {"F.linear": lambda: [F.linear(x, layer.weight) for layer in layers],
               "af3 linear": lambda: [layer(x) for layer in layers]}
    if compile:
        kernels["compiled (compile=True's)"] = torch.compile(lambda: [linear(x, layer.weight) for layer in layers])
        if x.dtype == torch.bfloat16:
            frozen = torch.compile(_Products(layers))
            with torch._inductor.config.patch(freezing=True):
                frozen(x)  # compiles and packs the weights here, with freezing on
            kernels["oneDNN prepacked"] = lambda: frozen(x)
    for run in kernels.values():
        run()
    for r in range(rounds):
        bw = read_bandwidth(2)
        rates = []
        for name, run in kernels.items():
            best = best_of(run, 3)
            rates.append(f"{name} {nbytes / best / 1e9:.1f} ({100 * nbytes / best / bw:.0f}%)")
        print(f"{'':9s} round {r + 1}, GB/s (% of {bw / 1e9:.1f} GB/s read just before): "
              + ", ".join(rates))


@torch.inference_mode()
def measure(hf, ours: AudioFlamingo3, ids: torch.Tensor, steps: int, compile: bool,
            rounds: int = 5) -> dict[str, list[tuple[float, float]]]:
    """For HF, af3 and af3 compiled (if asked), each timed run's seconds per decode step and the
    read bandwidth measured just before it; `rounds` runs each, interleaved. The machine's memory
    speed changes from minute to minute, so each run is set against its own bandwidth."""
    prompt = ids.shape[1]
    hf_prefilled = hf(input_ids=ids, use_cache=True).cache
    cache = ours.new_cache(1, prompt + steps)
    ours(ids, cache=cache)
    mask = torch.ones(1, prompt + steps, dtype=torch.long)  # HF's, cut to each step's length
    filled = torch.zeros(1, prompt + steps, dtype=torch.long)  # af3's: the slots holding tokens
    filled[:, :prompt] = 1
    slots = [torch.tensor([prompt + i]) for i in range(steps)]

    def hf_decode():
        kv, token = copy.deepcopy(hf_prefilled), torch.zeros(1, 1, dtype=torch.long)
        for i in range(steps):
            out = hf(input_ids=token, attention_mask=mask[:, :prompt + i + 1], cache=kv, use_cache=True)
            kv, token = out.cache, out.logits[:, -1:].argmax(-1)

    def af3_decode(step=decode_one_token):
        token = torch.zeros(1, 1, dtype=torch.long)
        filled[:, prompt:] = 0  # each run writes the same slots again
        for i in range(steps):
            filled.index_fill_(1, slots[i], 1)
            token = step(ours, token, filled, cache, slots[i], slots[i][None]).argmax(-1, keepdim=True)

    runs = {"HF": hf_decode, "af3": af3_decode}
    if compile:
        compiled = compiled_decode_one_token(ours, torch.device("cpu"))
        runs["af3 compile=True"] = lambda: af3_decode(compiled)
    for run in runs.values():  # warm-up (and compilation)
        run()
    out = {name: [] for name in runs}
    for _ in range(rounds):  # interleaved, so all see the same machine
        for name, run in runs.items():
            bw = read_bandwidth(2)
            start = time.perf_counter()
            run()
            out[name].append(((time.perf_counter() - start) / steps, bw))
    return out


if __name__ == "__main__":
    main()
