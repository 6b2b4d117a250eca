"""Benchmark: af3's AudioFlamingo3 vs transformers' on the same random weights (same run).

Times (1) a prefill forward with audio (encoder + projector + decoder) on a left-padded batch,
(2) the same for one short clip (af3's encoder skips positions past the longest valid window)
and (3) 32 greedy decoding steps after a prefill, with each implementation's KV cache (af3 eager,
and af3 with the decode step compiled; HF eager in both rows), HF and af3 interleaved, best of
3 or 5 rounds. Prints the times and the ratio HF / af3 (> 1 means af3 is faster), and where an
eager step's time goes: its products and attention alone, and the same math and weights
written without modules (`flat_step`), interleaved with HF's and af3's steps.
Run: .venv/bin/python tests/bench_model.py
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.nn.functional as F

from af3.attention import additive_mask, attention
from af3.generation import compiled_decode_one_token, decode_one_token
from af3.qwen2 import causal_mask, linear, rope_cos_sin
from tests.model_helpers import hf_to_af3_model, tiny_hf_model
from tests.test_model import hf_positions, make_batch
from tests.timing import best, best_of, interleaved

AUDIO = {"d_model": 256, "encoder_layers": 4, "encoder_attention_heads": 4, "encoder_ffn_dim": 1024}
TEXT = {"vocab_size": 160, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 2}
STEPS = 32


def main() -> None:
    torch.manual_seed(0)
    hf = tiny_hf_model(audio=AUDIO, **TEXT)
    ours = hf_to_af3_model(hf)
    b = make_batch([[3000, 1200], [2000]], seed=0)
    del b["labels"]
    pos = hf_positions(b["attention_mask"])
    ids, attn = b["input_ids"], b["attention_mask"]
    n, t = ids.shape
    print(f"batch {n} x {t} tokens, {b['input_features'].shape[0]} audio windows; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")

    with torch.inference_mode():
        def hf_prefill():
            return hf(**b, position_ids=pos, use_cache=True)

        def af3_prefill(cache=None):
            return ours(**b, cache=cache)

        short = make_batch([[500]], seed=1)  # one 5 s clip
        del short["labels"]
        prefill = best(interleaved({"HF": hf_prefill, "af3": af3_prefill}, 3))
        clip = best(interleaved({"HF": lambda: hf(**short), "af3": lambda: ours(**short)}, 3))
        rows = [("prefill (audio + text)", prefill["HF"], prefill["af3"]),
                ("prefill, one 5 s clip", clip["HF"], clip["af3"])]

        # Decoding alone: each run restarts from a prefilled cache (the prefill is not timed).
        hf_prefilled = hf_prefill().cache

        def hf_decode():
            cache, mask, p = copy.deepcopy(hf_prefilled), attn, pos[:, -1:]
            token = torch.zeros(n, 1, dtype=torch.long)
            for _ in range(STEPS):
                mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype)], 1)
                p = p + 1
                out = hf(input_ids=token, attention_mask=mask, position_ids=p, cache=cache, use_cache=True)
                cache, token = out.cache, out.logits[:, -1:].argmax(-1)

        # af3: prefill once into a cache with room for the steps, then decode_one_token as
        # generate runs it (a static mask of the filled slots, each step adding its own; slots
        # and positions as tensors).
        af3_cache = ours.new_cache(n, t + STEPS)
        ours(**b, cache=af3_cache)
        mask = torch.cat([attn, torch.ones(n, STEPS, dtype=attn.dtype)], 1)  # real tokens, for causal_mask
        filled = torch.cat([attn, torch.zeros(n, STEPS, dtype=attn.dtype)], 1)
        slots = [torch.tensor([t + i]) for i in range(STEPS)]
        positions = [pos[:, -1:] + 1 + i for i in range(STEPS)]

        def af3_decode(step=decode_one_token):
            token = torch.zeros(n, 1, dtype=torch.long)
            filled[:, t:] = 0  # each run writes the same slots again
            for i in range(STEPS):
                filled.index_fill_(1, slots[i], 1)
                token = step(ours, token, filled, af3_cache, slots[i], positions[i]).argmax(-1, keepdim=True)

        compiled = compiled_decode_one_token(ours, torch.device("cpu"))
        start = time.perf_counter()
        af3_decode(compiled)  # compiles
        print(f"compiling the decode step took {time.perf_counter() - start:.1f} s")
        decode = best(interleaved({"HF": hf_decode, "af3": af3_decode, "compiled": lambda: af3_decode(compiled)}, 5))
        rows += [(f"{STEPS} cached decoding steps", decode["HF"], decode["af3"]),
                 (f"{STEPS} steps, compile=True", decode["HF"], decode["compiled"])]

        where_the_time_goes(ours, af3_cache, causal_mask(mask, slots[0], mask.shape[1]), rows[2][2])
        eager_floor(ours, af3_cache, mask, slots, positions, hf_decode, af3_decode)

    for name, t_hf, t_af3 in rows:
        print(f"{name:28s} HF {t_hf * 1000:8.1f} ms   af3 {t_af3 * 1000:8.1f} ms   HF/af3 {t_hf / t_af3:5.2f}x")
    for name, t_hf, t_af3 in rows[2:]:
        print(f"{name:28s} per token: HF {t_hf / STEPS * 1000:.2f} ms, af3 {t_af3 / STEPS * 1000:.2f} ms")


def where_the_time_goes(model, cache, mask: torch.Tensor, t_eager: float) -> None:
    """An eager step's matrix products and attention alone (its modules, its cache, its order,
    nothing between them), against the whole step; and one layer's attention as af3 calls SDPA
    (each key/value head's query heads as rows of one head, additive mask) against SDPA with
    enable_gqa and a bool mask, as transformers calls it."""
    d, cfg = model.decoder, model.decoder.cfg
    n, h = mask.shape[0], cfg.num_attention_heads
    x, xb = torch.zeros(n, 1, cfg.hidden_size), torch.zeros(n, 1, cfg.intermediate_size)
    q = torch.randn(n, h, 1, cfg.head_dim)
    bias = additive_mask(mask, x.dtype)

    def products_and_attention():
        for _ in range(STEPS):
            for i, layer in enumerate(d.layers):
                attn, mlp = layer.attn, layer.mlp
                attn.qkv(x)
                attention(q, cache.k[i], cache.v[i], bias, scale=cfg.head_dim**-0.5)
                attn.o(x), mlp.gate(x), mlp.up(x), mlp.down(xb)
            d.logits(x)

    alone = best_of(products_and_attention, 5)
    print(f"eager step {t_eager / STEPS * 1000:.2f} ms a token; its products and attention alone "
          f"{alone / STEPS * 1000:.2f} ms ({100 * alone / t_eager:.0f}%); the rest of its operator calls "
          f"{(t_eager - alone) / STEPS * 1000:.2f} ms")
    k, v = cache.k[0], cache.v[0]
    t = best(interleaved({
        "HF": lambda: [F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True) for _ in range(100)],
        "af3": lambda: [attention(q, k, v, bias, scale=cfg.head_dim**-0.5) for _ in range(100)]}, 3))
    hf_like, ours = t["HF"], t["af3"]
    print(f"one layer's decode attention over {k.shape[2]} slots: SDPA with enable_gqa and a bool mask "
          f"{hf_like * 1e4:.0f} us, af3 {ours * 1e4:.0f} us")


def eager_floor(model, cache, mask, slots, positions, hf_decode, af3_decode) -> None:
    """af3's eager step against `flat_step` (the same math, weights and kernels, without the
    modules af3 keeps for readability, LoRA and quantization), with the masks and RoPE table
    made before timing and, second, made in each step as af3 does; all interleaved with HF's."""
    n = mask.shape[0]
    steps = {"flat": flat_step(model, mask, slots), "tables": flat_step(model, mask, slots, per_step=True)}
    token = torch.zeros(n, 1, dtype=torch.long)
    filled = mask * (torch.arange(mask.shape[1]) <= slots[0])  # as generate has it at the first step
    for step in steps.values():
        torch.testing.assert_close(step(token, cache, 0, positions[0]),
                                   decode_one_token(model, token, filled, cache, slots[0], positions[0]))

    def decode(step):
        token = torch.zeros(n, 1, dtype=torch.long)
        for i in range(STEPS):
            token = step(token, cache, i, positions[i]).argmax(-1, keepdim=True)

    runs = {"HF": hf_decode, "af3": af3_decode, **{k: (lambda s=s: decode(s)) for k, s in steps.items()}}
    t = {k: v / STEPS * 1000 for k, v in best(interleaved(runs, 5)).items()}
    print(f"eager steps, interleaved, ms a token (HF / that): HF {t['HF']:.2f}; af3 {t['af3']:.2f} "
          f"({t['HF'] / t['af3']:.2f}x); af3's math without modules "
          f"{t['flat']:.2f} ({t['HF'] / t['flat']:.2f}x), the same making its mask and RoPE "
          f"in each step {t['tables']:.2f} ({t['HF'] / t['tables']:.2f}x)")


def flat_step(model, attention_mask: torch.Tensor, slots: list[torch.Tensor], per_step: bool = False):
    """af3's eager decode step, for comparison only, without the modules af3 keeps for
    readability and for LoRA and quantization (which replace linears): the same weights (q/k/v
    merged), math and kernels (the split MLP products, SDPA over grouped rows), RoPE
    applied to q and k in one call; each slot's mask and the RoPE table made in advance
    (per_step: in each step, as af3 does). step(token (B, 1), cache, i, position_ids
    (B, 1)) -> float logits (B, V) for the token at slots[i]."""
    d, cfg = model.decoder, model.decoder.cfg
    h, h_kv, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    layers = [(l.attn_norm.weight, l.attn.qkv.weight, l.attn.qkv.bias, l.attn.o.weight, l.mlp_norm.weight,
               l.mlp.gate.weight, l.mlp.up.weight, l.mlp.down.weight) for l in d.layers]
    slots_all = torch.arange(attention_mask.shape[1])[None]  # a position never exceeds its slot
    cos, sin = (t[0, 0] for t in rope_cos_sin(slots_all, hd, cfg.rope_theta, torch.float32))  # (S, hd)
    masks = [additive_mask(causal_mask(attention_mask, s, attention_mask.shape[1]), torch.float32) for s in slots]

    def step(token, cache, i, position_ids):
        x = d.embed_tokens.weight[token[:, 0]]  # (B, d)
        b = x.shape[0]
        if per_step:
            c, s = (t[:, 0] for t in rope_cos_sin(position_ids, hd, cfg.rope_theta, x.dtype))  # (B, 1, hd)
            m = additive_mask(causal_mask(attention_mask, slots[i], attention_mask.shape[1]), x.dtype)
        else:
            c, s, m = cos[position_ids], sin[position_ids], masks[i]
        for j, (g1, wqkv, bqkv, wo, g2, wg, wu, wd) in enumerate(layers):
            qkv = linear(F.rms_norm(x, g1.shape, g1, eps), wqkv, bqkv).view(b, h + 2 * h_kv, hd)
            qk = qkv[:, :h + h_kv] * c + qkv[:, :h + h_kv].roll(hd // 2, -1) * s
            cache.k[j].index_copy_(2, slots[i], qk[:, h:, None])
            cache.v[j].index_copy_(2, slots[i], qkv[:, h + h_kv:, None])
            y = F.scaled_dot_product_attention(qk[:, :h].reshape(b, h_kv, h // h_kv, hd), cache.k[j], cache.v[j],
                                               attn_mask=m, scale=hd**-0.5)
            x = x + linear(y.view(b, h * hd), wo)
            h2 = F.rms_norm(x, g2.shape, g2, eps)
            x = x + linear(F.silu(linear(h2, wg)) * linear(h2, wu), wd)
        return d.logits(F.rms_norm(x, d.norm.weight.shape, d.norm.weight, eps))

    return step


if __name__ == "__main__":
    main()
