"""A checkpoint as a user gets it from transformers 5: `save_pretrained`, `python -m weights_convert`, `af3.load`.

Model and processor are saved by transformers itself (tests/tiny_checkpoint.py, style "new"); the
same transformers objects, reloaded with `from_pretrained`, are the reference for ids, logits,
greedy tokens and the loss.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import af3
from af3.frontend import MAX_SECONDS
from weights_convert import hf_files
from weights_convert.__main__ import main as convert_cli

# The files transformers 5.24 writes for AF3 (model + processor save_pretrained).
HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "processor_config.json", "chat_template.jinja"}


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """(HF folder, af3 bundle, HF model, HF processor), built once per test session."""
    from transformers import (
        AudioFlamingo3ForConditionalGeneration,
        AudioFlamingo3Processor,
    )

    from tests.tiny_checkpoint import write_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("saved_by_transformers")
    src = write_tiny_hf_checkpoint(root / "hf", style="new")
    assert convert_cli([str(src), str(root / "af3"), "--quiet"]) == 0
    hf = AudioFlamingo3ForConditionalGeneration.from_pretrained(str(src)).float().eval()
    return src, af3.load(root / "af3"), hf, AudioFlamingo3Processor.from_pretrained(str(src))


def conversations():
    rng = np.random.default_rng(3)
    speech = (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32)
    beep = (0.2 * np.sin(np.arange(8000) * 2 * np.pi * 440 / 16000)).astype(np.float32)
    return [
        [{"role": "user", "content": [{"type": "audio", "audio": speech},
                                      {"type": "text", "text": "Transcribe the input speech."}]}],
        [{"role": "user", "content": [{"type": "text", "text": "What is the sound?"},
                                      {"type": "audio", "audio": beep}]},
         {"role": "assistant", "content": [{"type": "text", "text": "A dog barking in the rain."}]}],
    ]


def both_inputs(bundle, processor, **kwargs):
    ours = bundle.processor.apply_chat_template(conversations(), **kwargs)
    ref = processor.apply_chat_template(conversations(), tokenize=True, return_dict=True, **kwargs)
    return ours, ref


def test_transformers_wrote_the_files_we_read(saved):
    src, bundle, _, _ = saved
    assert {p.name for p in src.iterdir()} == HF_FILES
    tok = json.loads((src / "tokenizer.json").read_text())
    assert tok["post_processor"]["type"] == "TemplateProcessing"  # what broke conversion before
    assert (src / "chat_template.jinja").read_text() == hf_files.AF3_CHAT_TEMPLATE
    processor_config = json.loads((src / "processor_config.json").read_text())
    assert processor_config["max_audio_len"] == 600 == MAX_SECONDS
    assert bundle.generation_config.top_k == 20 and bundle.generation_config.eos_token_id == [558, 556]


def test_chat_template_constant_is_the_checkpoints(shared_tokenizer_dir):
    assert (shared_tokenizer_dir / "chat_template.jinja").read_text() == hf_files.AF3_CHAT_TEMPLATE


def test_same_inputs_logits_and_loss_as_transformers(saved):
    _, bundle, hf, processor = saved
    ours, ref = both_inputs(bundle, processor, add_generation_prompt=False)
    for key in ("input_ids", "attention_mask", "input_features_mask"):
        assert torch.equal(ours[key].long(), ref[key].long()), key
    torch.testing.assert_close(ours["input_features"], ref["input_features"], atol=1e-4, rtol=0)
    attn = ref["attention_mask"]
    assert (attn[:, 0] == 0).any()  # left padding, so a row's first token is predicted from padding
    labels = ours["input_ids"].masked_fill(attn == 0, -100)
    # HF counts the target a padding position predicts; af3 ignores it: compare over the rest.
    hf_labels = labels.clone()
    hf_labels[:, 1:] = hf_labels[:, 1:].masked_fill(attn[:, :-1] == 0, -100)
    position_ids = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)
    with torch.no_grad():
        want = hf(**ref, labels=hf_labels, position_ids=position_ids)
        got = bundle.model(**ours, labels=labels)
        counted = hf(**ref, labels=labels, position_ids=position_ids).loss
    real = attn.bool()
    torch.testing.assert_close(got.logits[real], want.logits[real], atol=1e-4, rtol=1e-4)
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * max(1.0, want.loss.item())
    assert abs(counted.item() - want.loss.item()) > 1e-3  # the removed targets do change HF's loss


def test_same_greedy_tokens_as_transformers(saved):
    _, bundle, hf, processor = saved
    ours, ref = both_inputs(bundle, processor, add_generation_prompt=True)
    with torch.no_grad():
        want = hf.generate(**ref, max_new_tokens=24, do_sample=False)
        got = bundle.model.generate(**ours, max_new_tokens=24, do_sample=False)
    assert torch.equal(got, want)
    n = ref["input_ids"].shape[1]
    # Ids of the padded embedding that the tokenizer lacks (583..599) decode to nothing, as in HF.
    assert bundle.processor.batch_decode(got[:, n:]) == processor.batch_decode(got[:, n:])


def _edit_json(name, change):
    def edit(folder):
        path = folder / name
        d = json.loads(path.read_text())
        change(d)
        path.write_text(json.dumps(d))
    return edit


def _adds_bos(d):
    d["post_processor"]["single"].insert(0, {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}})
    d["post_processor"]["special_tokens"] = {"<|im_start|>": {"id": "<|im_start|>", "ids": [557],
                                                               "tokens": ["<|im_start|>"]}}


# Each field of a transformers-written file that af3 would not honour, and the words naming it.
REFUSED = {
    "tokenizer adds tokens": (_edit_json("tokenizer.json", _adds_bos), "adds the special tokens ['<|im_start|>']"),
    "tokenizer broken": (_edit_json("tokenizer.json", lambda d: d["model"]["vocab"].pop("Ġ")), "lacks 1 of the 256"),
    "pad token": (_edit_json("tokenizer_config.json", lambda d: d.update(pad_token="<|im_end|>")), "pad_token"),
    "add_bos_token": (_edit_json("tokenizer_config.json", lambda d: d.update(add_bos_token=True)), "add_bos_token"),
    "dither": (_edit_json("processor_config.json", lambda d: d["feature_extractor"].update(dither=0.5)), "dither"),
    "extractor": (_edit_json("processor_config.json",
                             lambda d: d["feature_extractor"].update(feature_extractor_type="Other")), "'Other'"),
    "nb_max_frames": (_edit_json("processor_config.json", lambda d: d["feature_extractor"].update(nb_max_frames=10)),
                      "nb_max_frames is 10"),
    "prompt": (_edit_json("processor_config.json", lambda d: d.update(default_transcription_prompt="Hi")),
               "default_transcription_prompt is 'Hi'"),
    "chat template": (lambda f: (f / "chat_template.jinja").write_text("{{ messages }}"), "chat template is not AF3's"),
    "beams": (_edit_json("generation_config.json", lambda d: d.update(num_beams=4)), "num_beams=4"),
    "unknown generation key": (_edit_json("generation_config.json", lambda d: d.update(my_knob=1)),
                               "my_knob=1 (unknown to af3)"),
    "sliding layers": (_edit_json("config.json", lambda d: d["text_config"].update(
        layer_types=["sliding_attention", "full_attention"])), "layer_types"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_fields_af3_would_not_honour_are_refused_at_conversion(saved, tmp_path, capsys, case):
    edit, words = REFUSED[case]
    src = shutil.copytree(saved[0], tmp_path / "hf")
    edit(src)
    assert convert_cli([str(src), str(tmp_path / "af3"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert words in err, err
    assert not (tmp_path / "af3").exists()


def test_dropout_is_named_in_the_summary(saved, tmp_path, capsys):
    src = shutil.copytree(saved[0], tmp_path / "hf")
    _edit_json("config.json", lambda d: d["audio_config"].update(dropout=0.1))(src)
    assert convert_cli([str(src), str(tmp_path / "af3"), "--quiet"]) == 0
    assert "ignored, as af3 trains without dropout: audio_config.dropout=0.1" in capsys.readouterr().out


def test_nvidia_llm_folder_keeps_its_own_tokenizer_settings(saved, tmp_path, capsys):
    from tests.tiny_checkpoint import write_tiny_nvidia_checkpoint

    nvidia = write_tiny_nvidia_checkpoint(tmp_path / "nvidia", saved[0])
    settings = {"eos_token": "<|endoftext|>", "chat_template": "{{ qwen2 }}", "add_bos_token": False}
    (nvidia / "llm" / "tokenizer_config.json").write_text(json.dumps(settings))
    assert convert_cli([str(nvidia), str(tmp_path / "af3"), "--quiet"]) == 0, capsys.readouterr().err
    (nvidia / "llm" / "tokenizer_config.json").write_text(json.dumps({**settings, "add_eos_token": True}))
    assert convert_cli([str(nvidia), str(tmp_path / "af3-2"), "--quiet"]) == 1
    assert "add_eos_token is true" in capsys.readouterr().err
