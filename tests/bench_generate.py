"""Greedy generation speed, af3 vs transformers, on the same small random weights.

    .venv/bin/python tests/bench_generate.py

A 4-layer d=256 model (GQA 8/2 heads), a prompt of 64 text tokens + 2 s of audio, 128 new
tokens, batch 1 and 4; tokens/s of HF, af3 and af3 with `compile=True` (the compile itself is
in the untimed warm-up run) and the ratios, best of 3 interleaved rounds in this run. Outputs
are checked equal (a benchmark of different answers would mean nothing).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from af3.generation import generate
from tests.model_helpers import TINY_AUDIO_ID, hf_to_af3_model, tiny_hf_model
from tests.timing import best, interleaved

NEW = 128


def inputs(batch: int):
    g = torch.Generator().manual_seed(0)
    frames = 200  # 2 s of audio -> 50 <sound> tokens
    ids = torch.cat([torch.randint(10, 150, (batch, 64), generator=g),
                     torch.full((batch, (frames + 1) // 4), TINY_AUDIO_ID)], dim=1)
    feats = torch.randn(batch, 128, 3000, generator=g)
    fmask = torch.zeros(batch, 3000, dtype=torch.long)
    fmask[:, :frames] = 1
    return ids, torch.ones_like(ids), feats, fmask


def main() -> None:
    torch.manual_seed(0)
    hf = tiny_hf_model(seed=0, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2)
    ours = hf_to_af3_model(hf)
    kw = {"max_new_tokens": NEW, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    af3_kw = {**kw, "eos_token_id": []}
    print(f"greedy, {NEW} new tokens, 4 layers d=256, threads={torch.get_num_threads()}")
    for batch in (1, 4):
        ids, mask, feats, fmask = inputs(batch)
        hf_args = {"input_ids": ids, "attention_mask": mask, "input_features": feats, "input_features_mask": fmask}
        with torch.inference_mode():
            runs = {"HF": lambda a=hf_args: hf.generate(**a, **kw),
                    "af3": lambda a=hf_args: generate(ours, **a, **af3_kw),
                    "compiled": lambda a=hf_args: generate(ours, **a, **af3_kw, compile=True)}
            outs = {name: run() for name, run in runs.items()}  # also the warm-up (and the compile)
            t = best(interleaved(runs, 3, warm_up=False))
        t_hf, t_af3, t_c = t["HF"], t["af3"], t["compiled"]
        out_hf, out_af3, out_c = outs["HF"], outs["af3"], outs["compiled"]
        tok = batch * NEW
        print(f"batch {batch}: HF {tok / t_hf:7.1f} tok/s | af3 {tok / t_af3:7.1f} tok/s, {t_hf / t_af3:.2f}x HF "
              f"| af3 compile=True {tok / t_c:7.1f} tok/s, {t_hf / t_c:.2f}x HF  "
              f"(outputs equal: {torch.equal(out_hf, out_af3) and torch.equal(out_hf, out_c)})")


if __name__ == "__main__":
    main()
