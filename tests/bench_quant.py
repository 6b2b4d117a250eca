"""Benchmark: int8 / int4 weight-only quantization against the float model (same run, 2 threads).

Prints, for a tiny and a mid model (Qwen2.5-0.5B decoder dimensions: hidden 896, 24 layers,
14 query / 2 key-value heads, MLP 4864, vocab 151936, untied head as in AF3; a 4-layer
Whisper-large-v3-width encoder, as tests/bench_mid.py), all with random weights:
- accuracy: cosine similarity of the last position's logits to the fp32 model over prompts
  with audio, and how many of the first 32 greedy tokens agree (before the first difference),
  for bf16 (no quantization), int8, int4 at group sizes 32, 64, 128 with the range search
  (af3.quant.int4_ranges) and without it (round to nearest over [min, max], "RTN");
- the bound: the squared error of each scheme on Gaussian weights against that of the best
  4-bit and 5-bit scalar quantizers (Lloyd-Max, computed here), and the mid model's cosine when
  every quantized weight gets independent Gaussian noise of those errors instead;
- size: bytes of the decoder's quantized linears and of the whole decoder vs bf16;
- speed (mid): greedy decode steps per second and the prefill of a 30 s clip, for fp32, bf16,
  int8 and int4 (float parts in bf16), interleaved so that load from other processes hits all alike;
- the README table for the real 8.3 B model, computed from its dimensions.
Run: .venv/bin/python tests/bench_quant.py [--quick | --decode | --accuracy]   (targets printed,
never asserted; --decode: only the mid model's decode speed; --accuracy: only accuracy and bound)
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import af3.quant
from af3.config import AF3Config, AudioConfig, QuantConfig, TextConfig
from af3.generation import decode_one_token
from af3.model import AudioFlamingo3
from af3.quant import quantize_model, quantized_linear_names, weight_bytes
from af3.windows import pooled_length
from tests.timing import interleaved

GB = 10**9
TINY = (AudioConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        TextConfig(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048))
MID = (AudioConfig(num_hidden_layers=4),
       TextConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096))
REAL = AF3Config()  # nvidia/audio-flamingo-3-hf's dimensions (the defaults: vocabulary 151 672)
SCHEMES = {"int8": QuantConfig("int8"), "int4 g32": QuantConfig("int4", 32),
           "int4 g64": QuantConfig("int4", 64), "int4 g128": QuantConfig("int4", 128)}
GREEDY = 32


def random_model(audio: AudioConfig, text: TextConfig, seed: int = 0) -> AudioFlamingo3:
    """Weights ~ N(0, 0.02) (the HF init), norms ~ 1 + N(0, 0.02), biases ~ N(0, 0.02)."""
    config = AF3Config(audio=audio, text=text, audio_token_id=text.vocab_size - 1, dtype="float32")
    torch.manual_seed(seed)
    model = AudioFlamingo3(config).eval()
    with torch.no_grad():  # in state-dict order, HF's (q, k and v apart): the same draws whatever af3 merges
        for name, p in model.state_dict().items():  # views of the parameters
            p.copy_(1 + 0.02 * torch.randn_like(p) if "norm" in name else 0.02 * torch.randn_like(p))
    return model


def prompt(model: AudioFlamingo3, seconds: float, seed: int) -> dict:
    """Text ids, <sound> x frames of a `seconds` clip, text ids; random log-mel features."""
    g = torch.Generator().manual_seed(seed)
    n_mel = int(seconds * 100)
    mask = torch.zeros(1, 3000, dtype=torch.long)
    mask[:, :n_mel] = 1
    frames = int(pooled_length(torch.tensor([n_mel])))
    vocab = model.config.text.vocab_size - 1  # the last id is <sound>
    ids = torch.cat([torch.randint(0, vocab, (8,), generator=g),
                     torch.full((frames,), model.config.audio_token_id),
                     torch.randint(0, vocab, (12,), generator=g)])[None]
    feats = torch.randn(1, model.config.audio.num_mel_bins, 3000, generator=g)
    return {"input_ids": ids, "input_features": feats * mask[:, None], "input_features_mask": mask}


@torch.inference_mode()
def greedy(model: AudioFlamingo3, inputs: dict, steps: int) -> tuple[torch.Tensor, list[int], float, float]:
    """Last prompt logits, `steps` greedy tokens, prefill seconds and seconds per decode step."""
    cache = model.new_cache(1, inputs["input_ids"].shape[1] + steps)
    t0 = time.perf_counter()
    logits = model(**inputs, cache=cache, logits_to_keep=1).logits[0, -1]
    t1 = time.perf_counter()
    first = logits.float()
    tokens = [int(logits.argmax())]
    for _ in range(steps - 1):
        logits = model(torch.tensor([[tokens[-1]]]), cache=cache, logits_to_keep=1).logits[0, -1]
        tokens.append(int(logits.argmax()))
    t2 = time.perf_counter()
    return first, tokens, t1 - t0, (t2 - t1) / max(1, steps - 1)


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@contextlib.contextmanager
def rtn():
    """int4 without the range search: each group's grid spans its [min, max] (round to nearest)."""
    saved = af3.quant.INT4_SHRINK, af3.quant.INT4_NUDGE
    af3.quant.INT4_SHRINK, af3.quant.INT4_NUDGE = (1.0,), ()
    try:
        yield
    finally:
        af3.quant.INT4_SHRINK, af3.quant.INT4_NUDGE = saved


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def accuracy(label: str, dims: tuple, prompts: list[tuple[float, int]], schemes: dict) -> None:
    ref = random_model(*dims)
    refs = [greedy(ref, prompt(ref, s, seed), GREEDY)[:2] for s, seed in prompts]
    print(f"\n{label}: accuracy vs fp32 over {len(prompts)} prompts with audio ({GREEDY} greedy tokens)")
    rows = [("bf16 (no quantization)", None, False)]
    for name, qc in schemes.items():
        rows.append((name, qc, False))
        if qc.scheme == "int4":
            rows.append((f"{name} RTN", qc, True))
    for name, qc, plain in rows:
        t0 = time.perf_counter()
        try:
            with rtn() if plain else contextlib.nullcontext():
                q = copy.deepcopy(ref).to(torch.bfloat16) if qc is None else quantize_model(copy.deepcopy(ref), qc)
        except ValueError as e:  # a group size larger than the layer
            print(f"  {name:22s} n/a: {e}")
            continue
        quantized = time.perf_counter() - t0
        cos, same = [], []
        for (s, seed), (logits, tokens) in zip(prompts, refs):
            ql, qt, _, _ = greedy(q, prompt(q, s, seed), GREEDY)
            cos.append(cosine(logits, ql))
            same.append(agree(tokens, qt))
        target = "" if qc is None else f" (target >= {0.999 if qc.scheme == 'int8' else 0.99})"
        print(f"  {name:22s} logits cosine min {min(cos):.5f} mean {sum(cos) / len(cos):.5f}{target}; greedy "
              f"tokens agreeing before the first difference: {same}; quantized in {quantized:.0f} s", flush=True)
        del q


def lloyd_max_mse(bits: int, iterations: int = 3000) -> float:
    """Mean squared error of the best scalar quantizer with 2**bits levels for N(0, 1) (Lloyd-Max).

    Lloyd's iteration on the exact density: each level moves to the mean of its cell, each cell
    edge to the midpoint of its levels; the error is 1 - sum(P(cell) * level**2)."""
    levels = torch.linspace(-3, 3, 2**bits, dtype=torch.float64)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    for _ in range(iterations):
        edges = (levels[1:] + levels[:-1]) / 2
        a, b = torch.cat([-inf, edges]), torch.cat([edges, inf])
        p = torch.special.ndtr(b) - torch.special.ndtr(a)
        pdf_a, pdf_b = (torch.exp(-x * x / 2) / math.sqrt(2 * math.pi) for x in (a, b))
        levels = (pdf_a - pdf_b) / p  # E[x | a < x < b]
    return float(1 - (p * levels**2).sum())


def symmetric_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w dequantized from symmetric int4 groups (levels -7.5..7.5 steps, one scale per group, the
    clipping ratio of af3.quant.INT4_SHRINK with the smallest squared error): for comparison only."""
    g = w.reshape(w.shape[0], -1, group_size)  # (N, K/G, G)
    absmax = g.abs().amax(-1, keepdim=True)
    best, best_err = None, None
    for r in af3.quant.INT4_SHRINK:
        step = (absmax * r / 7.5).clamp(min=1e-12).to(torch.bfloat16).float()
        d = (torch.round(g / step - 0.5).clamp(-8, 7) + 0.5) * step
        err = ((d - g) ** 2).sum(-1, keepdim=True)
        best = d if best is None else torch.where(err < best_err, d, best)
        best_err = err if best_err is None else torch.minimum(err, best_err)
    return best.reshape(w.shape)


def weight_errors(schemes: dict) -> dict[str, float]:
    """Mean squared error / variance of each scheme on a Gaussian 4096 x 896 matrix."""
    from af3.quant import dequantize_int4, dequantize_int8, quantize_weight

    w = torch.randn(4096, 896, generator=torch.Generator().manual_seed(0))
    errors = {f"Lloyd-Max {b} bits": lloyd_max_mse(b) for b in (4, 5)}
    for name, qc in schemes.items():
        if qc.scheme == "int8":
            d = dequantize_int8(*quantize_weight(w, qc).values())
            errors[name] = float(((d - w) ** 2).mean())
            continue
        for label, ctx in ((name, contextlib.nullcontext()), (f"{name} RTN", rtn())):
            with ctx:
                t = quantize_weight(w, qc)
            d = dequantize_int4(t["weight"], t["scales"], t["zeros"], qc.group_size)
            errors[label] = float(((d - w) ** 2).mean())
        errors[f"{name} symmetric"] = float(((symmetric_int4(w, qc.group_size) - w) ** 2).mean())
    return errors


@torch.inference_mode()
def bound(label: str, dims: tuple, prompts: list[tuple[float, int]], schemes: dict) -> None:
    """What independent Gaussian noise with a quantizer's squared error does to the logits."""
    errors = weight_errors(schemes)
    bits = {"int8": 8, "int4 g32": 5, "int4 g64": 4.5, "int4 g128": 4.25}
    print("\nSquared error / variance of each scheme on a Gaussian 4096 x 896 matrix (bits per weight with "
          "the bf16 scales and zeros):")
    for name, e in errors.items():
        b = next((v for k, v in bits.items() if name.startswith(k)), None)
        print(f"  {name:22s} {e:.5f}" + (f"   ({b} bits per weight)" if b else ""))
    model = random_model(*dims)
    inputs = [prompt(model, s, seed) for s, seed in prompts]
    ref = [model(**x, logits_to_keep=1).logits[0, -1].float() for x in inputs]
    weights = [model.get_submodule(n).weight for n in quantized_linear_names(model)]
    print(f"\n{label}: logits cosine to fp32 when every quantized weight w gets independent noise "
          f"N(0, e * var(w)) (fp32, {len(prompts)} prompts):")
    g = torch.Generator().manual_seed(0)
    slopes = []
    for name in ("Lloyd-Max 4 bits", "int4 g32", "Lloyd-Max 5 bits"):
        saved = [w.clone() for w in weights]
        for w in weights:
            w += torch.randn(w.shape, generator=g) * (w.std() * math.sqrt(errors[name]))
        cos = [cosine(r, model(**x, logits_to_keep=1).logits[0, -1].float()) for r, x in zip(ref, inputs)]
        for w, old in zip(weights, saved):
            w.copy_(old)
        slopes.append((1 - min(cos)) / errors[name])
        print(f"  e = {errors[name]:.5f} ({name}): cosine min {min(cos):.5f} mean {sum(cos) / len(cos):.5f}; "
              f"(1 - min cosine) / e = {slopes[-1]:.2f}", flush=True)
    # 1 - cosine grows in proportion to e (the slopes above): the e that gives 0.99, and the bits
    # that any quantizer of Gaussian weights needs for it (Shannon: e >= 2**(-2 * bits)).
    need = 0.01 / min(slopes)
    print(f"  cosine >= 0.99 needs e <= {need:.5f} (at the gentlest slope): Lloyd-Max needs "
          f"{next(b for b in range(4, 12) if lloyd_max_mse(b) <= need)} bits per weight for it, and any "
          f"quantizer at least {0.5 * math.log2(1 / need):.2f} bits (Shannon's rate-distortion bound)")


def sizes(label: str, config: AF3Config) -> None:
    bf16 = weight_bytes(config, None, torch.bfloat16)
    print(f"\n{label}: decoder size vs bf16 (scales and zeros in bf16)")
    for name, qc in SCHEMES.items():
        if qc.group_size and config.text.hidden_size % qc.group_size:
            continue
        q = weight_bytes(config, qc, torch.bfloat16)
        dec = ("decoder linears", "embeddings", "decoder other")
        lin = q["decoder linears"] / bf16["decoder linears"]
        whole = sum(q[k] for k in dec) / sum(bf16[k] for k in dec)
        target = 0.55 if qc.scheme == "int8" else 0.33
        print(f"  {name:9s} quantized linears {lin:.3f}x, whole decoder (float embeddings) {whole:.3f}x "
              f"(target <= {target}x)")


def real_table() -> None:
    print("\nThe real model (nvidia/audio-flamingo-3-hf dimensions), GB = 1e9 bytes, weights only:")
    rows = [("fp32", None, torch.float32), ("bf16", None, torch.bfloat16),
            ("int8 + bf16", QuantConfig("int8"), torch.bfloat16),
            ("int4 g64 + bf16", QuantConfig("int4", 64), torch.bfloat16),
            ("int4 g128 + bf16", QuantConfig("int4", 128), torch.bfloat16)]
    print("| weights | decoder linears | embeddings | decoder norms, biases | audio encoder | projector | total |")
    print("|---|---|---|---|---|---|---|")
    for label, qc, dt in rows:
        b = weight_bytes(REAL, qc, dt)
        print(f"| {label} | " + " | ".join(f"{v / GB:.2f}" for v in b.values()) + f" | {sum(b.values()) / GB:.2f} |")


def speed(dims: tuple, steps: int, repeats: int) -> None:
    torch.set_num_threads(2)
    base = random_model(*dims)
    models = {"fp32": base, "bf16": copy.deepcopy(base).to(torch.bfloat16)}
    for name in ("int8", "int4 g64", "int4 g128"):
        models[name] = quantize_model(copy.deepcopy(models["bf16"]), SCHEMES[name])
    inputs = prompt(base, 30.0, seed=1)
    print(f"\nmid model speed, {torch.get_num_threads()} threads, prompt {inputs['input_ids'].shape[1]} "
          f"tokens (a 30 s clip), {steps} greedy steps; best of {repeats}, interleaved:")
    best = {k: [float("inf"), float("inf")] for k in models}
    for _ in range(repeats):
        for name, m in models.items():
            _, _, prefill, step = greedy(m, inputs, steps)
            best[name] = [min(best[name][0], prefill), min(best[name][1], step)]
    for name, (prefill, step) in best.items():
        print(f"  {name:9s} prefill {prefill:6.2f} s   decode {1 / step:6.1f} tokens/s")
    d = {k: 1 / v[1] for k, v in best.items()}
    print(f"  int8 decode: {d['int8'] / d['fp32']:.2f}x fp32 (target >= 2), {d['int8'] / d['bf16']:.2f}x bf16 "
          f"(target >= 1.3); int4 g64 {d['int4 g64'] / d['int8']:.2f}x int8, int4 g128 "
          f"{d['int4 g128'] / d['int8']:.2f}x int8 (target >= 1)")
    for name in ("int8", "int4 g64", "int4 g128"):
        print(f"  {name} prefill {best[name][0] / best['bf16'][0]:.2f}x the bf16 time (target <= 1.5x)")


def decode_speed(dims: tuple, steps: int = 16, repeats: int = 3) -> None:
    """Decode steps only (a 64-token text prompt), for fp32, bf16, int8 and int4 g128, interleaved."""
    torch.set_num_threads(2)
    base = random_model(*dims)
    models = {"fp32": base, "bf16": copy.deepcopy(base).to(torch.bfloat16)}
    for name in ("int8", "int4 g128"):
        models[name] = quantize_model(copy.deepcopy(models["bf16"]), SCHEMES[name])
    prompt = 64
    ids = torch.randint(0, 150000, (1, prompt), generator=torch.Generator().manual_seed(0))
    slots = [torch.tensor([prompt + i]) for i in range(steps)]  # one past the prompt, then on

    def decoding(m: AudioFlamingo3):
        """`steps` decode steps as `generate` runs them, after a prompt prefilled once (untimed):
        each call writes the same cache slots again."""
        cache = m.new_cache(1, prompt + steps)
        m(ids, cache=cache)
        filled = torch.zeros(1, prompt + steps, dtype=torch.long)  # the slots holding tokens

        def run():
            filled[:, :prompt], filled[:, prompt:] = 1, 0
            for slot in slots:
                filled.index_fill_(1, slot, 1)
                decode_one_token(m, torch.tensor([[7]]), filled, cache, slot, slot[None])
        return run

    with torch.inference_mode():
        times = interleaved({name: decoding(m) for name, m in models.items()}, repeats)
    best = {name: min(t) / steps for name, t in times.items()}
    print(f"\nmid model decode only, {torch.get_num_threads()} threads, best of {repeats} x {steps} steps:")
    for name, t in best.items():
        print(f"  {name:9s} {1 / t:6.2f} tokens/s ({t * 1e3:.0f} ms/step)")
    print(f"  int8 {best['fp32'] / best['int8']:.2f}x fp32 (target >= 2), {best['bf16'] / best['int8']:.2f}x "
          f"bf16 (target >= 1.3); int4 g128 {best['int8'] / best['int4 g128']:.2f}x int8 (target >= 1)")


def layer_speed(repeats: int = 40) -> None:
    """Six 896 -> 4864 layers at M = 1: the kernels alone, fp32 in and out for the quantized ones."""
    import statistics

    from af3.quant import Int4Linear, Int8Linear

    torch.set_num_threads(2)
    torch.manual_seed(0)
    fp32 = [torch.nn.Linear(896, 4864, bias=False) for _ in range(6)]
    stacks = {"fp32": fp32, "bf16": [copy.deepcopy(lin).to(torch.bfloat16) for lin in fp32],
              "int8": [Int8Linear.from_float(lin) for lin in fp32],
              "int4 g128": [Int4Linear.from_float(lin, 128) for lin in fp32]}
    for layers in stacks.values():
        for m in layers:
            if hasattr(m, "pack_for_kernel"):
                m.pack_for_kernel()
    x = torch.randn(1, 896)
    times = {k: [] for k in stacks}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, layers in stacks.items():
                xi = x.to(torch.bfloat16) if name == "bf16" else x
                t0 = time.perf_counter()
                for m in layers:
                    m(xi)
                times[name].append(time.perf_counter() - t0)
    print(f"\nsix 896 x 4864 layers at M = 1, {torch.get_num_threads()} threads, median of {repeats}:")
    for name, t in times.items():
        print(f"  {name:9s} {statistics.median(t) * 1e3:7.2f} ms")


def main() -> None:
    if "--decode" in sys.argv:
        layer_speed()
        decode_speed(MID)
        return
    quick = "--quick" in sys.argv
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    prompts = [(3.0, 0), (10.0, 1), (30.0, 2)] if quick else [(3.0, 0), (7.5, 1), (10.0, 2), (20.0, 3), (30.0, 4)]
    mid_prompts = [(3.0, 0), (7.5, 1), (10.0, 2)]
    if "--accuracy" in sys.argv:
        accuracy("tiny (hidden 64, 2 layers)", TINY, prompts, SCHEMES)
        accuracy("mid (Qwen2.5-0.5B decoder dims)", MID, mid_prompts, SCHEMES)
        bound("mid", MID, mid_prompts, SCHEMES)
        return
    accuracy("tiny (hidden 64, 2 layers)", TINY, prompts, SCHEMES)
    sizes("tiny", AF3Config(audio=TINY[0], text=TINY[1], audio_token_id=599))
    sizes("mid", AF3Config(audio=MID[0], text=MID[1], audio_token_id=151935))
    real_table()
    sizes("the real model", REAL)
    accuracy("mid (Qwen2.5-0.5B decoder dims)", MID, mid_prompts, SCHEMES)
    bound("mid", MID, mid_prompts, SCHEMES)
    speed(MID, steps=16 if quick else 32, repeats=2 if quick else 3)


if __name__ == "__main__":
    main()
