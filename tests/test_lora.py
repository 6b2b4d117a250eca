"""af3.lora: adapters in place, merge / unmerge, PEFT files that HF PEFT and weights_convert read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import af3
from af3 import lora
from tests.model_helpers import hf_to_af3_model, tiny_hf_model
from tests.test_model import assert_close_scaled, hf_positions, make_batch
from weights_convert.convert import convert
from weights_convert.names import af3_to_hf, hf_to_af3

EVERY_GROUP = lora.DECODER_TARGETS + lora.ENCODER_ATTENTION_TARGETS + lora.PROJECTOR_TARGETS + ("decoder.lm_head",)
# Some projections of af3's merged attn.qkv and not others (q and v, not k between them), as PEFT
# configs often target them, and a plain linear beside them.
SOME_PARTS = ("decoder.layers.*.attn.q", "decoder.layers.*.attn.v", "decoder.layers.*.mlp.up")


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Give every B a random value (a fresh adapter's B is zero and would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)


def inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(seed=3)


@pytest.fixture(scope="module")
def batch():
    return make_batch([[801], [401]], padding_side="right")


def test_names_round_trip(hf) -> None:
    for name in hf.state_dict():
        assert af3_to_hf(hf_to_af3(name)) == name
    assert af3_to_hf("decoder.layers.1.mlp.gate") == "model.language_model.layers.1.mlp.gate_proj"
    assert af3_to_hf("decoder.lm_head") == "lm_head"
    with pytest.raises(ValueError, match="'decoder.layers.0.attn.o.bias' is not an af3"):
        af3_to_hf("decoder.layers.0.attn.o.bias")  # Qwen2's o_proj has no bias


def test_fresh_adapter_changes_nothing_and_only_adapters_train(hf, batch) -> None:
    model = hf_to_af3_model(hf)
    base = model(**inputs(batch)).logits
    names = lora.add_lora(model, rank=4, alpha=8, targets=EVERY_GROUP)
    assert len(names) == 2 * 7 + 2 * 4 + 2 + 1
    assert torch.equal(model(**inputs(batch)).logits, base)  # B = 0: exactly the base model
    adapters = lora.lora_layers(model)
    assert sorted(adapters) == sorted(names)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for a in adapters.values() for p in (a.lora_A, a.lora_B)}
    # The base weights keep their state-dict names.
    assert "decoder.layers.0.attn.q.weight" in model.state_dict()


@pytest.mark.parametrize("targets", [EVERY_GROUP, SOME_PARTS], ids=["every-group", "some-parts"])
def test_merge_equals_unmerged_and_unmerge_restores(hf, batch, targets) -> None:
    model = hf_to_af3_model(hf)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_lora(model, rank=4, alpha=8, targets=targets)
    randomize(model)
    unmerged = model(**inputs(batch)).logits
    assert (unmerged - hf_to_af3_model(hf)(**inputs(batch)).logits).abs().max() > 1e-2  # B acts
    lora.merge(model)
    assert (model(**inputs(batch)).logits - unmerged).abs().max() <= 1e-5
    lora.unmerge(model)
    assert (model(**inputs(batch)).logits - unmerged).abs().max() <= 1e-5
    for k, v in model.state_dict().items():
        if k in before:
            assert (v - before[k]).abs().max() <= 1e-6, k


def test_gradient_checkpointing_gives_the_same_gradients(hf, batch) -> None:
    model = hf_to_af3_model(hf).train()
    lora.add_lora(model, rank=4, alpha=8, dropout=0.1, targets=EVERY_GROUP)
    randomize(model)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.encoder.gradient_checkpointing = model.decoder.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks; checkpointing replays them in the recomputation
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        model(**batch)  # still checkpointing: the forward pass keeps only what each layer is given
    kept_with = sum(saved)
    model.encoder.gradient_checkpointing = model.decoder.gradient_checkpointing = False
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        model(**batch)
    assert kept_with < sum(saved) / 2
    assert all(g.abs().max() > 0 for n, g in plain.items() if n.endswith("lora_B"))
    for name, g in plain.items():
        assert (checkpointed[name] - g).abs().max() <= 1e-5, name


@pytest.mark.parametrize("targets", [EVERY_GROUP, SOME_PARTS], ids=["every-group", "some-parts"])
def test_saved_adapter_loads_in_hf_peft_with_the_same_logits(hf, batch, tmp_path, targets) -> None:
    from peft import PeftModel

    model = hf_to_af3_model(hf)
    lora.add_lora(model, rank=4, alpha=8, targets=targets)
    randomize(model)
    ours = model(**inputs(batch)).logits
    lora.save_adapter(model, tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    peft_model = PeftModel.from_pretrained(tiny_hf_model(seed=3), str(tmp_path / "adapter")).eval()
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_B" in n)
    assert n_lora == len(lora.lora_layers(model))
    with torch.no_grad():
        theirs = peft_model(**inputs(batch), position_ids=hf_positions(batch["attention_mask"])).logits
    assert_close_scaled(ours, theirs)
    assert (theirs - hf(**inputs(batch)).logits).abs().max() > 1e-2  # the adapter did act


def test_adapter_merged_by_weights_convert_and_loaded_by_load_adapter(tmp_path) -> None:
    from tests.tiny_checkpoint import write_tiny_hf_checkpoint

    write_tiny_hf_checkpoint(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "base")
    m = af3.load(tmp_path / "base")
    inputs = m.processor.apply_transcription_request(torch.randn(24000) * 0.1)
    lora.add_lora(m.model, rank=2, alpha=3, targets=lora.DECODER_TARGETS + lora.PROJECTOR_TARGETS)
    randomize(m.model, seed=1)
    ours = m.model(**inputs).logits
    lora.save_adapter(m.model, tmp_path / "adapter")

    convert(tmp_path / "hf", tmp_path / "merged", adapter=tmp_path / "adapter")
    merged = af3.load(tmp_path / "merged").model(**inputs).logits
    assert (merged - ours).abs().max() <= 1e-5

    fresh = af3.load(tmp_path / "base")
    assert len(lora.load_adapter(fresh.model, tmp_path / "adapter")) == 2 * 7 + 2
    assert torch.equal(fresh.model(**inputs).logits, ours)  # unmerged: the same computation


def test_load_adapter_reads_nvidia_thinking_layout(hf, batch, tmp_path) -> None:
    """NVIDIA's think/ adapter wraps its own model: `base_model.model.llm.model.layers…lora_A.default.weight`."""
    model = hf_to_af3_model(hf)
    lora.add_lora(model, rank=4, alpha=16, targets=lora.DECODER_TARGETS)
    randomize(model)
    ours = model(**inputs(batch)).logits
    lora.save_adapter(model, tmp_path / "adapter")
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    nvidia = {}
    for key, value in tensors.items():
        key = key.replace("base_model.model.model.language_model.", "base_model.model.llm.model.")
        nvidia[key.replace(".weight", ".default.weight")] = value
    (tmp_path / "think").mkdir()
    save_file(nvidia, str(tmp_path / "think" / "adapter_model.safetensors"))
    (tmp_path / "think" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj"]}))

    fresh = hf_to_af3_model(hf)
    lora.load_adapter(fresh, tmp_path / "think")
    assert torch.equal(fresh(**inputs(batch)).logits, ours)


def test_bad_targets_and_quantized_modules(hf, tmp_path) -> None:
    model = hf_to_af3_model(hf)
    with pytest.raises(ValueError, match="'decoder.layers.*.attn.qq' matches no module"):
        lora.add_lora(model, targets=("decoder.layers.*.attn.qq",))
    with pytest.raises(ValueError, match=r"'decoder.layers.\*.attn.qkv' names decoder.layers.0.attn.qkv, which merges "
                                         r"decoder.layers.0.attn.q, decoder.layers.0.attn.k, decoder.layers.0.attn.v: "
                                         "target those"):
        lora.add_lora(model, targets=("decoder.layers.*.attn.qkv",))
    with pytest.raises(TypeError, match="decoder.embed_tokens is a Embedding"):
        lora.add_lora(model, targets=("decoder.embed_tokens",))

    class Int8Linear(nn.Module):  # what a quantized module looks like to add_lora: not a float nn.Linear
        pass

    model.decoder.layers[0].attn.qkv = Int8Linear()
    with pytest.raises(TypeError, match=r"decoder.layers.0.attn.q \(in decoder.layers.0.attn.qkv\) is a Int8Linear: "
                                        "quantized"):
        lora.add_lora(model)
    assert not lora.lora_layers(model)  # nothing half-added
    with pytest.raises(ValueError, match="rank must be a positive int, got 0"):
        lora.add_lora(hf_to_af3_model(hf), rank=0)
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        lora.save_adapter(hf_to_af3_model(hf), tmp_path / "none")

    model = hf_to_af3_model(hf)
    lora.add_lora(model, rank=2)
    with pytest.raises(ValueError, match="decoder.layers.0.attn.q already has a LoRA adapter"):
        lora.add_lora(model, rank=2)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken exists; pass overwrite=True"):
        lora.save_adapter(model, tmp_path / "taken")
    with pytest.raises(ValueError, match="is not an adapter folder"):
        lora.save_adapter(model, tmp_path / "taken", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary folder left behind
