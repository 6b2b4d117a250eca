"""`generate` against transformers' `generate` with every logits processor doing real work.

A processor that never changes the output cannot be checked by comparing outputs, so each test
also shows that its setting changes the tokens (the penalty on prompt tokens, top-k, top-p,
temperature; shown with transformers, or with af3 once af3 is equal to transformers). The batch
holds a 45 s clip (two encoder windows) beside a 20 s one, left-padded; under the penalty an eos
stops one row early.
"""

from __future__ import annotations

import pytest
import torch

from af3.generation import generate
from tests.model_helpers import TINY_AUDIO_ID, hf_to_af3_model, tiny_hf_model
from tests.test_generation import PAD, left_pad

N_NEW = 12

# The text of each prompt holds ids the model goes on to produce unpenalised (147, 142, 14), so
# the penalty on prompt tokens changes the output; audio goes after the first ids.
PROMPTS = [[5, 6, 9, 147, 8], [11, 142, 14]]
EOS = 150  # row 1 reaches it at its third new token under the penalty, row 0 never does


@pytest.fixture(scope="module")
def models():
    hf = tiny_hf_model(seed=1)
    return hf, hf_to_af3_model(hf)


@pytest.fixture(scope="module")
def batch():
    """Row 0: 45 s of audio (a full window, then half of one); row 1: 20 s (one window)."""
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(3, 128, 3000, generator=g)  # windows: clip 0, clip 0, clip 1
    fmask = torch.zeros(3, 3000, dtype=torch.long)
    fmask[0], fmask[1, :1500], fmask[2, :2000] = 1, 1, 1
    sounds = [750 + 375, 500]  # (valid frames + 1) // 4 per window
    rows = [PROMPTS[0][:3] + [TINY_AUDIO_ID] * sounds[0] + PROMPTS[0][3:],
            PROMPTS[1][:1] + [TINY_AUDIO_ID] * sounds[1] + PROMPTS[1][1:]]
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "input_features": feats, "input_features_mask": fmask}


def hf_generate(hf, inputs, seed: int | None = None, **kw):
    if seed is not None:
        torch.manual_seed(seed)
    return hf.generate(**inputs, pad_token_id=PAD, max_new_tokens=N_NEW, **kw)


def af3_generate(model, inputs, seed: int | None = None, **kw):
    if seed is not None:
        torch.manual_seed(seed)
    return generate(model, inputs["input_ids"], inputs["attention_mask"], inputs["input_features"],
                    inputs["input_features_mask"], pad_token_id=PAD, max_new_tokens=N_NEW, **kw)


def test_audio_changes_the_output(models, batch):
    """Otherwise nothing below would check the audio path."""
    _, ours = models
    silent = dict(batch, input_features=torch.zeros_like(batch["input_features"]))
    kw = {"do_sample": False, "eos_token_id": None}
    assert not torch.equal(af3_generate(ours, batch, **kw), af3_generate(ours, silent, **kw))


def test_greedy_with_the_penalty_on_prompt_tokens_equals_transformers(models, batch):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
    )

    hf, ours = models
    width = batch["input_ids"].shape[1]
    kw = {"do_sample": False, "eos_token_id": [EOS]}
    theirs = hf_generate(hf, batch, repetition_penalty=1.5, **kw)
    # The settings are live: without the penalty, or with it on generated tokens only, the
    # tokens differ (so a penalty that skipped the prompt could not pass).
    assert not torch.equal(hf_generate(hf, batch, **kw), theirs)
    generated_only = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=width)])
    assert not torch.equal(hf_generate(hf, batch, logits_processor=generated_only, **kw), theirs)
    # eos stops row 1 early; row 0 runs on and row 1 is padded after its eos.
    new = theirs[:, width:]
    assert (new[1] == EOS).any() and not (new[0] == EOS).any() and new.shape[1] == N_NEW
    assert torch.equal(af3_generate(ours, batch, repetition_penalty=1.5, **kw), theirs)


# (name, the setting under test, the same with that processor switched off)
SAMPLING = [
    ("top_k", {"temperature": 1.0, "top_k": 5, "top_p": 1.0}, {"top_k": 0}),
    # 0.7, not 0.5: at 0.5 a top-p that dropped mass <= top_p instead of <= 1 - top_p would pass.
    ("top_p", {"temperature": 1.0, "top_k": 0, "top_p": 0.7}, {"top_p": 1.0}),
    ("temperature", {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05},
     {"temperature": 1.0}),
]


@pytest.mark.parametrize("name, setting, switched_off", SAMPLING, ids=[s[0] for s in SAMPLING])
def test_seeded_sampling_equals_transformers(models, batch, name, setting, switched_off):
    hf, ours = models
    kw = {"do_sample": True, "eos_token_id": None, "seed": 3}
    theirs = hf_generate(hf, batch, **setting, **kw)
    mine = af3_generate(ours, batch, **setting, **kw)
    assert torch.equal(mine, theirs)
    # The processor under test changes the sampled tokens (af3's side shown equal to HF's above).
    assert not torch.equal(af3_generate(ours, batch, **{**setting, **switched_off}, **kw), mine), (
        f"{name} does not change the output here: choose other settings")
