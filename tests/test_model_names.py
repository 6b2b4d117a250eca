"""weights_convert.names: both HF spellings map onto exactly af3's state dict; unknown names raise."""

from __future__ import annotations

import pytest

from tests.model_helpers import hf_to_af3_model, tiny_hf_model
from weights_convert.names import UnknownTensorError, hf_to_af3


def old_style(name: str) -> str:
    """transformers 4.x names of a checkpoint (what nvidia/audio-flamingo-3-hf first shipped)."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("model.language_model."):
        return "language_model.model." + name.removeprefix("model.language_model.")
    return name.removeprefix("model.")


def test_every_hf_tensor_maps_onto_the_model_in_both_styles() -> None:
    hf = tiny_hf_model()
    ours = hf_to_af3_model(hf)  # strict load: the map covers every tensor, one to one
    new = sorted(hf.state_dict())
    assert sorted(hf_to_af3(n) for n in new) == sorted(ours.state_dict())
    assert [hf_to_af3(old_style(n)) for n in new] == [hf_to_af3(n) for n in new]


@pytest.mark.parametrize("hf_name, ours", [
    ("audio_tower.layers.12.self_attn.k_proj.weight", "encoder.layers.12.attn.k.weight"),
    ("model.audio_tower.layers.0.self_attn.out_proj.bias", "encoder.layers.0.attn.o.bias"),
    ("audio_tower.layers.3.final_layer_norm.weight", "encoder.layers.3.mlp_norm.weight"),
    ("audio_tower.layer_norm.bias", "encoder.norm.bias"),
    ("model.audio_tower.embed_positions.weight", "encoder.embed_positions.weight"),
    ("multi_modal_projector.linear_2.bias", "projector.linear2.bias"),
    ("language_model.model.layers.27.post_attention_layernorm.weight", "decoder.layers.27.mlp_norm.weight"),
    ("model.language_model.layers.1.self_attn.k_proj.bias", "decoder.layers.1.attn.k.bias"),
    ("model.language_model.layers.1.mlp.down_proj.weight", "decoder.layers.1.mlp.down.weight"),
    ("model.language_model.embed_tokens.weight", "decoder.embed_tokens.weight"),
    ("language_model.lm_head.weight", "decoder.lm_head.weight"),
    ("lm_head.weight", "decoder.lm_head.weight"),
])
def test_known_names(hf_name: str, ours: str) -> None:
    assert hf_to_af3(hf_name) == ours


@pytest.mark.parametrize("name", [
    "audio_tower.layers.0.self_attn.k_proj.bias",  # Whisper's k_proj has no bias
    "model.language_model.layers.0.self_attn.o_proj.bias",  # Qwen2's o_proj has no bias
    "model.language_model.layers.0.mlp.gate_proj.bias",
    "model.language_model.rotary_emb.inv_freq",
    "audio_tower.avg_pooler.weight",
    "multi_modal_projector.linear_3.weight",
    "model.layers.0.self_attn.q_proj.weight",  # a bare Qwen2 name: not an AF3 checkpoint name
    "lm_head.bias",
    "audio_tower.layers.x.fc1.weight",
    "",
])
def test_unknown_names_raise_naming_them(name: str) -> None:
    with pytest.raises(UnknownTensorError, match=repr(name).replace(".", r"\.")):
        hf_to_af3(name)
    assert issubclass(UnknownTensorError, ValueError)


def test_non_string_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="str"):
        hf_to_af3(3)  # type: ignore[arg-type]


def test_full_size_af3_maps_name_for_name_and_shape_for_shape() -> None:
    """The real model's dimensions (Whisper-large-v3 encoder, Qwen2.5-7B decoder), built on the
    meta device (no memory): the map and hf_config.config_from_hf hold at full scale, not only on tiny
    configs, and the parameter count is AF3's 8.3 B."""
    import torch
    from transformers import (
        AudioFlamingo3Config,
        AudioFlamingo3ForConditionalGeneration,
    )

    from af3.model import AudioFlamingo3
    from weights_convert.hf_config import config_from_hf

    hf_config = AudioFlamingo3Config(
        audio_config={"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20,
                      "encoder_ffn_dim": 5120, "num_mel_bins": 128, "max_source_positions": 1500},
        text_config={"model_type": "qwen2", "vocab_size": 151672, "hidden_size": 3584,
                     "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                     "num_key_value_heads": 4, "max_position_embeddings": 32768, "rope_theta": 1e6,
                     "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
        audio_token_id=151669)
    with torch.device("meta"):
        hf = AudioFlamingo3ForConditionalGeneration(hf_config)
        ours = AudioFlamingo3(config_from_hf(hf_config.to_dict()))
    hf_shapes = {hf_to_af3(n): tuple(t.shape) for n, t in hf.state_dict().items()}
    our_shapes = {n: tuple(t.shape) for n, t in ours.state_dict().items()}
    assert hf_shapes == our_shapes
    assert our_shapes["decoder.layers.0.attn.k.weight"] == (512, 3584)  # 4 kv heads of 128
    assert our_shapes["projector.linear1.weight"] == (3584, 1280)
    n_params = sum(t.numel() for t in ours.state_dict().values())
    assert 8.2e9 < n_params < 8.4e9, n_params
