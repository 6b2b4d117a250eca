"""GPU benchmark at the real model's dimensions (random weights), af3 vs transformers in the same run.

    .venv/bin/python tests/bench_gpu.py [--steps 64] [--prompt 512] [--no-compile] [--no-parity]

AF3's full size (Qwen2.5-7B decoder, Whisper-large-v3 encoder, 8.3 B parameters, 16.6 GB in
bf16): transformers' AudioFlamingo3ForConditionalGeneration built on the GPU with its own random
init, and af3's model holding the same tensors (no second copy). Prints:

- parity at full size, fp32 then bf16: logits of a prompt with one 30 s window of audio (the
  largest difference, and how many positions pick a different top token), and whether 16
  greedy tokens are the same;
- bf16 decoding at batch 1 after a `--prompt`-token prompt: tokens/s of transformers (eager),
  af3 eager and af3 with compile=True (CUDA graphs), each as a share of the HBM floor (bytes of
  weights read per token / read bandwidth measured here by summing a 4 GiB tensor); interleaved,
  best of 3;
- the encoder (with the projector) per 30 s window, batches of 1 and 8, af3 and transformers.

Needs a CUDA GPU with about 70 GB free (the fp32 parity check; `--no-parity` needs 20 GB); on a
machine without one it says so and exits 0. `--tiny` runs the same code at tiny dimensions (on
the CPU without a GPU), to check the script itself.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from af3.config import AF3Config
from af3.generation import compiled_decode_one_token, decode_one_token, generate
from af3.model import AudioFlamingo3
from tests.bench_mid import bytes_per_token
from tests.model_helpers import TINY_AUDIO, TINY_TEXT, af3_model_sharing

PAD = 0


def real_dims() -> tuple[dict, dict, int]:
    """transformers' audio_config and text_config at AF3's dimensions (af3's defaults), and the
    audio token id."""
    c = AF3Config()
    a, t = c.audio, c.text
    audio = {"num_mel_bins": a.num_mel_bins, "d_model": a.hidden_size, "encoder_layers": a.num_hidden_layers,
             "encoder_attention_heads": a.num_attention_heads, "encoder_ffn_dim": a.intermediate_size,
             "max_source_positions": a.max_source_positions}
    text = {"vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta, "tie_word_embeddings": False}
    return audio, text, c.audio_token_id


def build(device: torch.device, tiny: bool):
    """transformers' model in fp32 on `device` (its own init, seeded, then noise on the biases and
    norm gains, which that init leaves at 0 and 1) and af3's holding the same tensors."""
    from transformers import (
        AudioFlamingo3Config,
        AudioFlamingo3ForConditionalGeneration,
    )

    audio, text, audio_id = (TINY_AUDIO, TINY_TEXT, 157) if tiny else real_dims()
    config = AudioFlamingo3Config(audio_config=audio, text_config=text, audio_token_id=audio_id)
    torch.manual_seed(0)
    with torch.device(device):
        hf = AudioFlamingo3ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.02)
    return hf, af3_model_sharing(hf)


def to_bf16(hf) -> None:
    """hf's parameters in bf16, its buffers (RoPE's inverse frequencies) left in fp32, as
    `from_pretrained(dtype=torch.bfloat16)` leaves them."""
    buffers = {name: b for name, b in hf.named_buffers()}
    hf.to(torch.bfloat16)
    for name, b in buffers.items():
        module, _, attr = name.rpartition(".")
        setattr(hf.get_submodule(module), attr, b)


def timer(device: torch.device):
    """fn -> best seconds per call over `repeats` (CUDA events on a GPU)."""
    def best(fn, repeats: int) -> float:
        out = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                out = min(out, start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                out = min(out, time.perf_counter() - t0)
        return out
    return best


def read_bandwidth(device: torch.device, best) -> float:
    x = torch.ones(2**30 if device.type == "cuda" else 2**26, dtype=torch.float32, device=device)
    return x.numel() * 4 / best(x.sum, 5)


def audio_prompt(audio_id: int, device: torch.device):
    """One 30 s window of random log-mel features and a prompt text + 750 <sound> + text."""
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 128, 3000, generator=g).to(device)
    fmask = torch.ones(1, 3000, dtype=torch.long, device=device)
    text = torch.randint(10, min(1000, audio_id), (1, 12), generator=g).tolist()[0]
    ids = torch.tensor([text[:6] + [audio_id] * 750 + text[6:]], device=device)
    return ids, torch.ones_like(ids), feats, fmask


@torch.inference_mode()
def parity(hf, ours: AudioFlamingo3, device: torch.device, label: str) -> None:
    ids, mask, feats, fmask = audio_prompt(ours.config.audio_token_id, device)
    feats = feats.to(next(ours.parameters()).dtype)
    theirs = hf(input_ids=ids, attention_mask=mask, input_features=feats, input_features_mask=fmask).logits.float()
    mine = ours(ids, mask, feats, fmask).logits.float()
    diff = (mine - theirs).abs()
    top = (mine.argmax(-1) != theirs.argmax(-1)).sum().item()
    text = ids[:, :6]  # the decoder alone: the prompt's text, no audio
    text_diff = (ours(text).logits.float() - hf(input_ids=text).logits.float()).abs().max().item()
    kw = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": PAD}
    hf_tokens = hf.generate(input_ids=ids, attention_mask=mask, input_features=feats, input_features_mask=fmask,
                            eos_token_id=None, **kw)
    af3_tokens = generate(ours, ids, mask, feats, fmask, eos_token_id=[], **kw)
    same = torch.equal(hf_tokens, af3_tokens)
    print(f"parity {label}: logits |af3 - HF| max {diff.max().item():.2e}, mean {diff.mean().item():.2e} "
          f"(|logit| up to {theirs.abs().max().item():.2f}); top token differs at {top} of {ids.shape[1]} "
          f"positions; 16 greedy tokens {'identical' if same else 'DIFFER'}; text only (the decoder alone): "
          f"max {text_diff:.2e}", flush=True)
    if not same:
        print(f"  HF  {hf_tokens[0, ids.shape[1]:].tolist()}\n  af3 {af3_tokens[0, ids.shape[1]:].tolist()}")


@torch.inference_mode()
def decode_speeds(hf, ours: AudioFlamingo3, device: torch.device, prompt: int, steps: int, compile: bool, best,
                  profile: bool = False, tuned: bool = False):
    """Seconds per decode step: HF eager, af3 eager, af3 compiled (if asked); interleaved, best of 3."""
    top = min(1000, ours.config.audio_token_id)
    ids = torch.randint(10, top, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    hf_prefilled = hf(input_ids=ids, use_cache=True).cache
    cache = ours.new_cache(1, prompt + steps)
    ours(ids, cache=cache)
    mask = torch.ones(1, prompt + steps, dtype=torch.long, device=device)  # HF's, cut to each step's length
    filled = torch.zeros(1, prompt + steps, dtype=torch.long, device=device)  # af3's: the slots holding tokens
    filled[:, :prompt] = 1
    slots = [torch.tensor([prompt + i], device=device) for i in range(steps)]

    def hf_decode():
        kv, token = copy.deepcopy(hf_prefilled), torch.zeros(1, 1, dtype=torch.long, device=device)
        for i in range(steps):
            out = hf(input_ids=token, attention_mask=mask[:, :prompt + i + 1], cache=kv, use_cache=True)
            kv, token = out.cache, out.logits[:, -1:].argmax(-1)

    def af3_decode(step=decode_one_token):
        token = torch.zeros(1, 1, dtype=torch.long, device=device)
        filled[:, prompt:] = 0  # each run writes the same slots again
        for i in range(steps):
            filled.index_fill_(1, slots[i], 1)
            token = step(ours, token, filled, cache, slots[i], slots[i][None]).argmax(-1, keepdim=True)

    runs = {"HF (eager)": hf_decode, "af3 eager": af3_decode}
    if compile:
        step = compiled_decode_one_token(ours, device)
        runs["af3 compile=True"] = lambda: af3_decode(step)
    for name, run in runs.items():  # warm-up (and compilation)
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    seconds = dict.fromkeys(runs, float("inf"))
    for _ in range(3):
        for name, run in runs.items():
            seconds[name] = min(seconds[name], best(run, 1) / steps)
    if tuned:  # the compiled step again, with inductor's coordinate-descent tuning of each kernel
        import torch._inductor.config as inductor_config

        from af3 import generation

        torch._dynamo.reset()
        generation._compiled.clear()
        inductor_config.coordinate_descent_tuning = True
        step2 = compiled_decode_one_token(ours, device)
        runs = {"af3 compiled, tuned": lambda: af3_decode(step2)}
        t0 = time.perf_counter()
        runs["af3 compiled, tuned"]()
        print(f"  warm-up af3 compiled, tuned: {time.perf_counter() - t0:.1f} s", flush=True)
        seconds["af3 compiled, tuned"] = min(best(runs["af3 compiled, tuned"], 1) / steps for _ in range(3))
    if profile:
        name, run = list(runs.items())[-1]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        print(f"profile of {steps} steps, {name}:")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=70))
    return seconds


@torch.inference_mode()
def encoder_seconds(hf, ours: AudioFlamingo3, device: torch.device, n: int, best) -> tuple[float, float]:
    """Seconds per 30 s window through encoder + projector, batches of n: (af3, HF)."""
    dtype = next(ours.parameters()).dtype
    feats = torch.randn(n, 128, 3000, device=device, dtype=dtype)
    fmask = torch.ones(n, 3000, dtype=torch.long, device=device)
    hf_audio = getattr(hf, "get_audio_features", None) or hf.model.get_audio_features
    runs = [lambda: ours._encode(feats, fmask), lambda: hf_audio(feats, fmask)]
    for run in runs:
        run()
    out = [float("inf")] * 2
    for _ in range(3):
        for i, run in enumerate(runs):
            out[i] = min(out[i], best(run, 1) / n)
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=64, help="decode steps timed (default 64)")
    p.add_argument("--prompt", type=int, default=512, help="tokens in the cache before decoding (default 512)")
    p.add_argument("--no-compile", action="store_true", help="no compiled af3 row")
    p.add_argument("--no-parity", action="store_true", help="skip the fp32 and bf16 parity checks")
    p.add_argument("--profile", action="store_true", help="print the GPU kernels of the last decode row's steps")
    p.add_argument("--tuned", action="store_true", help="also time the compiled step with inductor's "
                   "coordinate-descent tuning")
    p.add_argument("--tiny", action="store_true", help="tiny dimensions, to check this script (CPU if no GPU)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        print("bench_gpu: no CUDA GPU here; nothing measured")
        return 0
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    best = timer(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    bandwidth = read_bandwidth(device, best)
    t0 = time.perf_counter()
    hf, ours = build(device, args.tiny)
    print(f"built {sum(p.numel() for p in ours.parameters()) / 1e9:.2f} B parameters in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    if not args.no_parity:
        parity(hf, ours, device, "fp32")
    to_bf16(hf)
    ours = af3_model_sharing(hf)  # over the bf16 tensors (q/k/v joined); the fp32 ones are freed
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_parity:
        parity(hf, ours, device, "bf16")
    floor = bytes_per_token(ours) / bandwidth
    print(f"read bandwidth {bandwidth / 1e9:.0f} GB/s; bf16 decoder weights {bytes_per_token(ours) / 1e9:.1f} "
          f"GB/token -> floor {floor * 1e3:.2f} ms/token ({1 / floor:.0f} tokens/s)", flush=True)
    seconds = decode_speeds(hf, ours, device, args.prompt, args.steps, not args.no_compile, best,
                            args.profile and device.type == "cuda", args.tuned and not args.no_compile)
    hf_s = seconds["HF (eager)"]
    for label, s in seconds.items():
        print(f"bf16 decode, {label:20s}: {1 / s:7.1f} tokens/s ({s * 1e3:.2f} ms/token, "
              f"{100 * floor / s:.0f}% of the HBM floor, {hf_s / s:.2f}x HF)", flush=True)
    for n in (1, 8):
        mine, theirs = encoder_seconds(hf, ours, device, n, best)
        print(f"encoder + projector, bf16, batch of {n} window(s): af3 {mine * 1e3:.1f} ms, HF {theirs * 1e3:.1f} ms "
              f"per 30 s window ({theirs / mine:.2f}x HF)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
