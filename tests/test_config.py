"""AF3Config: reading HF config.json dicts, derived values, checks, and our own JSON."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from transformers import AudioFlamingo3Config, Qwen2Config, WhisperFeatureExtractor

from af3.config import (
    FORMAT_VERSION,
    AF3Config,
    AudioConfig,
    ConfigError,
    FrontendConfig,
    TextConfig,
)

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


def test_from_hf_gives_af3_dimensions(hf_config: dict) -> None:
    cfg = AF3Config.from_hf(hf_config)
    assert cfg == AF3Config()  # our defaults are AF3's
    assert cfg.audio.hidden_size == 1280 and cfg.audio.num_hidden_layers == 32
    assert cfg.text.hidden_size == 3584 and cfg.text.num_key_value_heads == 4
    assert cfg.text.rope_theta == 1_000_000.0
    assert cfg.audio_token_id == 151669


def test_rope_theta_both_placements(hf_config: dict) -> None:
    old = copy.deepcopy(hf_config)
    del old["text_config"]["rope_parameters"]
    old["text_config"]["rope_theta"] = 1_000_000.0  # older files: at the top of text_config
    assert AF3Config.from_hf(old).text.rope_theta == AF3Config.from_hf(hf_config).text.rope_theta == 1e6
    old["text_config"]["rope_theta"] = 5e5
    assert AF3Config.from_hf(old).text.rope_theta == 5e5


def test_dtype_and_torch_dtype(hf_config: dict) -> None:
    assert AF3Config.from_hf(hf_config).dtype == "bfloat16"  # absent: the checkpoint's bf16
    hf_config["dtype"] = "float32"
    assert AF3Config.from_hf(hf_config).dtype == "float32"
    del hf_config["dtype"]
    hf_config["torch_dtype"] = "float16"  # older files
    assert AF3Config.from_hf(hf_config).dtype == "float16"
    del hf_config["torch_dtype"]
    hf_config["text_config"]["torch_dtype"] = "torch.float32"
    assert AF3Config.from_hf(hf_config).dtype == "float32"
    hf_config["dtype"] = "int8"
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        AF3Config.from_hf(hf_config)


def test_older_whisper_key_names(hf_config: dict) -> None:
    audio = hf_config["audio_config"]
    for new, old in [("hidden_size", "d_model"), ("num_hidden_layers", "encoder_layers"),
                     ("num_attention_heads", "encoder_attention_heads"), ("intermediate_size", "encoder_ffn_dim")]:
        audio[old] = audio.pop(new)
    assert AF3Config.from_hf(hf_config).audio == AudioConfig()


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
        AF3Config.from_hf(hf_config)


def test_unsupported_variants_are_refused(hf_config: dict) -> None:
    sliding = copy.deepcopy(hf_config)
    sliding["text_config"]["use_sliding_window"] = True
    with pytest.raises(ConfigError, match="use_sliding_window"):
        AF3Config.from_hf(sliding)
    hf_config["text_config"]["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        AF3Config.from_hf(hf_config)
    with pytest.raises(TypeError, match="config must be a dict"):
        AF3Config.from_hf("config.json")


def test_derived_values() -> None:
    cfg = AF3Config()
    assert cfg.audio.head_dim == 1280 // 20 == 64
    assert cfg.text.head_dim == 3584 // 28 == 128
    assert cfg.text.n_rep == 28 // 4 == 7
    assert cfg.frontend.n_samples == 480_000
    assert cfg.frontend.n_frames == 3000
    assert cfg.frontend.max_samples == 9_600_000
    assert TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32).head_dim == 32  # an explicit head_dim wins


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: AudioConfig(hidden_size=100, num_attention_heads=3), "hidden_size 100 is not divisible by"),
        (lambda: TextConfig(hidden_size=100, num_attention_heads=3, num_key_value_heads=1),
         "hidden_size 100 is not divisible by num_attention_heads 3"),
        (lambda: TextConfig(num_attention_heads=28, num_key_value_heads=5),
         "num_attention_heads 28 is not divisible by num_key_value_heads 5"),
        (lambda: TextConfig(hidden_size=60, num_attention_heads=4, num_key_value_heads=4), "head_dim 15 must be even"),
        (lambda: AudioConfig(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
        (lambda: FrontendConfig(chunk_length=1, hop_length=300), "not a multiple of hop_length 300"),
        (lambda: AF3Config(frontend=FrontendConfig(num_mel_bins=80)), "80 mel bins but the encoder expects 128"),
        (lambda: AF3Config(audio_token_id=200_000), "outside the vocabulary"),
        (lambda: AF3Config(audio=AudioConfig(max_source_positions=1000)), "max_source_positions is 1000"),
    ],
)
def test_checks(build, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build()


def test_feature_extractor_settings(hf_config: dict) -> None:
    pre = WhisperFeatureExtractor(feature_size=128).to_dict()
    assert AF3Config.from_hf(hf_config, pre).frontend == FrontendConfig()
    # processor_config.json nests the feature extractor and carries max_audio_len.
    nested = AF3Config.from_hf(hf_config, {"feature_extractor": pre, "max_audio_len": 300})
    assert nested.frontend.max_windows == 10
    with pytest.raises(ConfigError, match="80 mel bins"):
        AF3Config.from_hf(hf_config, WhisperFeatureExtractor(feature_size=80).to_dict())


def tiny() -> AF3Config:
    return AF3Config(
        audio=AudioConfig(num_mel_bins=128, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=32),
        text=TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        tie_word_embeddings=True),
        audio_token_id=299, dtype="float32",
    )


@pytest.mark.parametrize("make", [AF3Config, tiny])
def test_json_round_trip(tmp_path, make) -> None:
    cfg = make()
    path = tmp_path / "config.json"
    cfg.save(path)
    assert AF3Config.load(path) == cfg
    assert AF3Config.from_dict(json.loads(path.read_text())) == cfg
    d = cfg.to_dict()
    assert d["format"] == "af3" and d["format_version"] == FORMAT_VERSION
    assert "head_dim" not in d["audio"] and "n_rep" not in d["text"]  # derived, not stored


def test_format_version_and_foreign_json_are_refused(tmp_path, hf_config: dict) -> None:
    d = AF3Config().to_dict()
    d["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ConfigError, match=f"format_version {FORMAT_VERSION + 1} is not supported"):
        AF3Config.from_dict(d)
    with pytest.raises(ConfigError, match="not an af3 config .*weights_convert"):
        AF3Config.from_dict(hf_config)
    d = AF3Config().to_dict()
    d["text"]["sliding_window"] = 4096
    with pytest.raises(ConfigError, match=r"config\.text: unknown keys \['sliding_window'\]"):
        AF3Config.from_dict(d)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.json"):
        AF3Config.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        AF3Config.load(bad)


def test_newer_format_version_says_what_to_do() -> None:
    d = AF3Config().to_dict()
    d["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ConfigError, match="newer af3: upgrade af3, or convert"):
        AF3Config.from_dict(d)


@pytest.mark.parametrize(("part", "key", "value", "match"), [
    ("text", "hidden_size", "48", r"TextConfig\.hidden_size must be an integer, got '48'"),
    ("text", "rope_theta", "x", r"TextConfig\.rope_theta must be a finite number, got 'x'"),
    ("text", "rms_norm_eps", "x", r"TextConfig\.rms_norm_eps must be a finite number"),  # was accepted
    ("text", "rms_norm_eps", -1.0, r"TextConfig\.rms_norm_eps must be positive"),
    ("audio", "scale_embedding", "no", r"AudioConfig\.scale_embedding must be true or false"),
    ("frontend", "hop_length", 160.5, r"FrontendConfig\.hop_length must be an integer"),
    (None, "audio_token_id", "5", r"AF3Config\.audio_token_id must be an integer, got '5'"),
    (None, "projector_bias", "yes", r"AF3Config\.projector_bias must be true or false"),
    (None, "text", [1], r"'text' must be an object, got list"),
    (None, "audio", 5, r"'audio' must be an object, got int"),
])
def test_wrong_types_in_our_json_are_named(tmp_path, part, key, value, match) -> None:
    d = AF3Config().to_dict()
    (d if part is None else d[part])[key] = value
    with pytest.raises(ConfigError, match=match):  # never a TypeError from a comparison inside
        AF3Config.from_dict(d)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=f"config.json: .*{match}"):  # load names the file
        AF3Config.load(path)


def test_int_values_for_float_fields_become_floats() -> None:
    d = AF3Config().to_dict()
    d["text"]["rope_theta"] = 10000
    cfg = AF3Config.from_dict(d)
    assert cfg.text.rope_theta == 10000.0 and isinstance(cfg.text.rope_theta, float)


def test_wrong_types_in_hf_configs_are_named(hf_config: dict) -> None:
    for key, value in (("audio_config", 5), ("text_config", [1])):
        with pytest.raises(ConfigError, match=f"'{key}' must be an object"):
            AF3Config.from_hf({**hf_config, key: value})
    bad = copy.deepcopy(hf_config)
    bad["text_config"]["rope_parameters"] = [1]
    with pytest.raises(ConfigError, match="rope_parameters / rope_scaling must be an object"):
        AF3Config.from_hf(bad)
    bad = copy.deepcopy(hf_config)
    bad["text_config"]["rms_norm_eps"] = "x"
    with pytest.raises(ConfigError, match="rms_norm_eps must be a finite number"):
        AF3Config.from_hf(bad)
    for pre, match in (({"sampling_rate": "x"}, "sampling_rate must be an integer"),
                       ({"chunk_length": [1]}, "chunk_length must be a positive integer"),
                       ({"feature_extractor": [1]}, "settings must be an object"),  # was silently ignored
                       ({"feature_extractor": {}, "max_audio_len": 10}, "max_audio_len .* at least one 30 s")):
        with pytest.raises(ConfigError, match=match):
            AF3Config.from_hf(hf_config, pre)


def test_load_refuses_non_object_json(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        AF3Config.load(path)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        AF3Config.load(path)


def test_save_is_atomic(tmp_path, monkeypatch) -> None:
    from af3.generation import GenerationConfig

    path = tmp_path / "config.json"
    AF3Config().save(path)
    before = path.read_text()

    real_write_text = Path.write_text

    def disk_full_halfway(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full_halfway)
    for cfg in (tiny(), GenerationConfig(max_new_tokens=7)):
        with pytest.raises(OSError, match="No space left"):
            cfg.save(path)
        assert path.read_text() == before  # the old file, whole; nothing beside it
        assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
