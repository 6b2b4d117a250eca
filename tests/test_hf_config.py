"""weights_convert.hf_config: reading transformers' AF3 config.json and feature-extractor settings."""

from __future__ import annotations

import copy

import pytest
from transformers import AudioFlamingo3Config, Qwen2Config, WhisperFeatureExtractor

from af3.config import AF3Config, AudioConfig, ConfigError
from weights_convert.hf_config import config_from_hf

# Qwen2.5-7B as AF3 uses it (what nvidia/audio-flamingo-3-hf's text_config says).
AF3_TEXT = {
    "vocab_size": 151672, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "tie_word_embeddings": False,
}


@pytest.fixture
def hf_config() -> dict:
    """What transformers writes to config.json for AF3 (newer style: rope_parameters, dtype)."""
    return AudioFlamingo3Config(text_config=Qwen2Config(**AF3_TEXT).to_dict()).to_dict()


def test_config_from_hf_gives_af3_dimensions(hf_config: dict) -> None:
    cfg = config_from_hf(hf_config)
    assert cfg == AF3Config()  # our defaults are AF3's
    assert cfg.audio.hidden_size == 1280 and cfg.audio.num_hidden_layers == 32
    assert cfg.text.hidden_size == 3584 and cfg.text.num_key_value_heads == 4
    assert cfg.text.rope_theta == 1_000_000.0
    assert cfg.audio_token_id == 151669


def test_rope_theta_both_placements(hf_config: dict) -> None:
    old = copy.deepcopy(hf_config)
    del old["text_config"]["rope_parameters"]
    old["text_config"]["rope_theta"] = 1_000_000.0  # older files: at the top of text_config
    assert config_from_hf(old).text.rope_theta == config_from_hf(hf_config).text.rope_theta == 1e6
    old["text_config"]["rope_theta"] = 5e5
    assert config_from_hf(old).text.rope_theta == 5e5


def test_dtype_and_torch_dtype(hf_config: dict) -> None:
    assert config_from_hf(hf_config).dtype == "bfloat16"  # absent: the checkpoint's bf16
    hf_config["dtype"] = "float32"
    assert config_from_hf(hf_config).dtype == "float32"
    del hf_config["dtype"]
    hf_config["torch_dtype"] = "float16"  # older files
    assert config_from_hf(hf_config).dtype == "float16"
    del hf_config["torch_dtype"]
    hf_config["text_config"]["torch_dtype"] = "torch.float32"
    assert config_from_hf(hf_config).dtype == "float32"
    hf_config["dtype"] = "int8"
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        config_from_hf(hf_config)


def test_older_whisper_key_names(hf_config: dict) -> None:
    audio = hf_config["audio_config"]
    for new, old in [("hidden_size", "d_model"), ("num_hidden_layers", "encoder_layers"),
                     ("num_attention_heads", "encoder_attention_heads"), ("intermediate_size", "encoder_ffn_dim")]:
        audio[old] = audio.pop(new)
    assert config_from_hf(hf_config).audio == AudioConfig()


@pytest.mark.parametrize(
    "part, key, match",
    [
        (None, "text_config", "config.json: required key 'text_config'"),
        (None, "audio_config", "config.json: required key 'audio_config'"),
        ("text_config", "hidden_size", "text_config: required key 'hidden_size'"),
        ("text_config", "vocab_size", "text_config: required key 'vocab_size'"),
        ("text_config", "rms_norm_eps", "text_config: required key 'rms_norm_eps'"),
        ("text_config", "rope_parameters", "text_config: required key 'rope_theta'"),
        ("audio_config", "num_mel_bins", "audio_config: required key 'num_mel_bins'"),
        ("audio_config", "hidden_size", "audio_config: required key 'hidden_size' / 'd_model'"),
    ],
)
def test_missing_required_key_is_named(hf_config: dict, part, key: str, match: str) -> None:
    del (hf_config[part] if part else hf_config)[key]
    with pytest.raises(ConfigError, match=match):
        config_from_hf(hf_config)


def test_unsupported_variants_are_refused(hf_config: dict) -> None:
    sliding = copy.deepcopy(hf_config)
    sliding["text_config"]["use_sliding_window"] = True
    with pytest.raises(ConfigError, match="use_sliding_window"):
        config_from_hf(sliding)
    hf_config["text_config"]["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        config_from_hf(hf_config)
    with pytest.raises(TypeError, match="config must be a dict"):
        config_from_hf("config.json")


def test_feature_extractor_settings(hf_config: dict) -> None:
    pre = WhisperFeatureExtractor(feature_size=128).to_dict()
    assert config_from_hf(hf_config, pre) == config_from_hf(hf_config) == AF3Config()
    # processor_config.json nests the feature extractor and carries max_audio_len.
    assert config_from_hf(hf_config, {"feature_extractor": pre, "max_audio_len": 600}) == AF3Config()
    with pytest.raises(ConfigError, match=r"max_audio_len is 300; AF3 hears 600 s"):
        config_from_hf(hf_config, {"feature_extractor": pre, "max_audio_len": 300})
    with pytest.raises(ConfigError, match=r"feature_size is 80; .* with 128 \(the encoder's num_mel_bins\)"):
        config_from_hf(hf_config, WhisperFeatureExtractor(feature_size=80).to_dict())
    # Every size of Whisper's frontend is fixed in af3: another value is refused by name.
    for key, value in (("sampling_rate", 8000), ("n_fft", 10**9), ("hop_length", 320), ("chunk_length", 10),
                       ("n_samples", 1), ("nb_max_frames", 1500)):
        with pytest.raises(ConfigError, match=rf"feature extractor: {key} is {value}; af3's frontend is Whisper's"):
            config_from_hf(hf_config, {**pre, key: value})
        with pytest.raises(ConfigError, match=rf"feature extractor: {key} is {value}; af3's frontend is Whisper's"):
            config_from_hf(hf_config, {"feature_extractor": {**pre, key: value}, "max_audio_len": 600})


def test_wrong_types_in_hf_configs_are_named(hf_config: dict) -> None:
    for key, value in (("audio_config", 5), ("text_config", [1])):
        with pytest.raises(ConfigError, match=f"'{key}' must be an object"):
            config_from_hf({**hf_config, key: value})
    bad = copy.deepcopy(hf_config)
    bad["text_config"]["rope_parameters"] = [1]
    with pytest.raises(ConfigError, match="rope_parameters / rope_scaling must be an object"):
        config_from_hf(bad)
    bad = copy.deepcopy(hf_config)
    bad["text_config"]["rms_norm_eps"] = "x"
    with pytest.raises(ConfigError, match="rms_norm_eps must be a finite number"):
        config_from_hf(bad)
    for pre, match in (({"sampling_rate": "x"}, "sampling_rate is 'x'"),
                       ({"chunk_length": [1]}, r"chunk_length is \[1\]"),
                       ({"feature_extractor": [1]}, "settings must be an object"),  # was silently ignored
                       ({"feature_extractor": {}, "max_audio_len": "600"}, "max_audio_len is '600'")):
        with pytest.raises(ConfigError, match=match):
            config_from_hf(hf_config, pre)
