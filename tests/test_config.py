"""AF3Config: derived values, checks, and af3's own versioned JSON (HF config.json: test_hf_config.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AudioFlamingo3Config

from af3.config import (
    FORMAT_VERSION,
    AF3Config,
    AudioConfig,
    ConfigError,
    TextConfig,
)


def test_derived_values() -> None:
    cfg = AF3Config()
    assert cfg.audio.head_dim == 1280 // 20 == 64
    assert cfg.text.head_dim == 3584 // 28 == 128
    assert cfg.text.n_rep == 28 // 4 == 7
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
        (lambda: AudioConfig(num_mel_bins=10**7), r"num_mel_bins 10,000,000 \(the mel filter bank\) would take 16,"),
        (lambda: AF3Config(audio_token_id=200_000), "outside the vocabulary"),
        (lambda: AF3Config(audio=AudioConfig(max_source_positions=1000)),
         "a 30 s window gives 1500 encoder positions but max_source_positions is 1000"),
        (lambda: AudioConfig(max_source_positions=2000), "max_source_positions is 2000"),  # was accepted
    ],
)
def test_checks(build, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build()


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


def test_format_version_and_foreign_json_are_refused(tmp_path) -> None:
    d = AF3Config().to_dict()
    d["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ConfigError, match=f"format_version {FORMAT_VERSION + 1} is not supported"):
        AF3Config.from_dict(d)
    with pytest.raises(ConfigError, match="not an af3 config .*weights_convert"):
        AF3Config.from_dict(AudioFlamingo3Config().to_dict())
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


def version_1(cfg: AF3Config) -> dict:
    """`cfg` as af3 wrote it before the frontend's fixed values left the config (format_version 1)."""
    d = cfg.to_dict()
    d["format_version"] = 1
    d["frontend"] = {"sampling_rate": 16000, "n_fft": 400, "hop_length": 160,
                     "num_mel_bins": cfg.audio.num_mel_bins, "chunk_length": 30, "max_windows": 20}
    return d


@pytest.mark.parametrize("make", [AF3Config, tiny])
def test_version_1_configs_are_read_and_their_frontend_checked(tmp_path, make) -> None:
    cfg = make()
    assert "frontend" not in cfg.to_dict() and FORMAT_VERSION == 2
    path = tmp_path / "config.json"
    path.write_text(json.dumps(version_1(cfg)))
    assert AF3Config.load(path) == cfg
    for key, value, match in (("n_fft", 10**9, "n_fft is 1000000000, but af3's frontend is Whisper's, fixed at 400"),
                              ("hop_length", 160.5, "hop_length is 160.5, .* fixed at 160"),
                              ("max_windows", 10, "max_windows is 10, .* fixed at 20"),
                              ("num_mel_bins", 80, f"num_mel_bins is 80, .* fixed at {cfg.audio.num_mel_bins}"),
                              ("window", 1, r"unknown keys \['window'\]")):
        d = version_1(cfg)
        d["frontend"][key] = value
        with pytest.raises(ConfigError, match=rf"config\.frontend: {match}"):
            AF3Config.from_dict(d)
    d = version_1(cfg)
    del d["frontend"]
    with pytest.raises(ConfigError, match="config: required key 'frontend' is missing"):
        AF3Config.from_dict(d)
    d = version_1(cfg)
    d["format_version"] = 2  # version 2 never has a frontend
    with pytest.raises(ConfigError, match=r"config: unknown keys \['frontend'\]"):
        AF3Config.from_dict(d)


def test_int_values_for_float_fields_become_floats() -> None:
    d = AF3Config().to_dict()
    d["text"]["rope_theta"] = 10000
    cfg = AF3Config.from_dict(d)
    assert cfg.text.rope_theta == 10000.0 and isinstance(cfg.text.rope_theta, float)


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



def test_is_real_takes_numbers_and_numpy_scalars_but_not_bools():
    import numpy as np

    from af3.config import is_real

    assert [is_real(v) for v in (1, 1.5, np.float32(2), np.int64(3))] == [True] * 4
    assert [is_real(v) for v in (True, np.bool_(False), "1", None, [1.0])] == [False] * 5
