"""The loss of a padded batch does not depend on the padding: left == right == the rows alone.

With left padding the last pad position "predicts" a row's first token from logits that saw no
real token; af3 leaves such targets out (transformers counts them: tests/test_transformers_checkpoint.py
compares with HF over the targets both define).
"""

from __future__ import annotations

import pytest
import torch

from tests.model_helpers import TINY_AUDIO_ID, hf_to_af3_model, tiny_hf_model
from tests.test_model import make_batch

WINDOWS = [[3000, 1001], [397], [8]]  # valid mel frames of each sample's windows


def every_token_labelled(batch: dict) -> torch.Tensor:
    """Labels on every real, non-audio token (what output_labels=True makes): the first token is a target."""
    ids = batch["input_ids"]
    return ids.masked_fill((batch["attention_mask"] == 0) | (ids == TINY_AUDIO_ID), -100)


@pytest.fixture(scope="module")
def model():
    return hf_to_af3_model(tiny_hf_model(seed=11))


def test_left_right_and_alone_give_the_same_loss(model):
    left, right = make_batch(WINDOWS, seed=3, padding_side="left"), make_batch(WINDOWS, seed=3, padding_side="right")
    first = left["attention_mask"].argmax(-1)
    assert (first > 0).sum() >= 2  # two rows are padded on the left
    with torch.no_grad():
        loss_left = model(**{**left, "labels": every_token_labelled(left)}).loss
        loss_right = model(**{**right, "labels": every_token_labelled(right)}).loss
        total, count, window = 0.0, 0, 0
        for i, sample in enumerate(WINDOWS):
            real = left["attention_mask"][i].bool()
            ids = left["input_ids"][i, real][None]
            features = slice(window, window + len(sample))
            window += len(sample)
            labels = every_token_labelled({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            alone = model(ids, input_features=left["input_features"][features],
                          input_features_mask=left["input_features_mask"][features], labels=labels).loss
            n = int((labels[:, 1:] != -100).sum())
            total, count = total + alone.item() * n, count + n
    assert abs(loss_left.item() - loss_right.item()) <= 1e-5
    assert abs(loss_left.item() - total / count) <= 1e-5
