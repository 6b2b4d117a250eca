"""An HF AudioFlamingo3 `config.json` (and its feature-extractor settings) -> af3's AF3Config.

Reading transformers' files is conversion's job: af3 itself reads only its own config.json
(af3/config.py), which `python -m weights_convert` writes. transformers has spelled the same
facts several ways over its versions, and this module knows each: RoPE's theta at the top of
`text_config` or inside `rope_parameters` (`rope_scaling` before that), `dtype` or `torch_dtype`
(on the whole config or on `text_config`), Whisper's `d_model` / `encoder_layers` /
`encoder_attention_heads` / `encoder_ffn_dim`, and `audio_token_index`. A field missing or of
the wrong type is a ConfigError naming it; the dataclasses of af3/config.py then check the values.
The feature extractor's settings are not settings for af3 (af3/frontend.py): they are checked to
be Whisper's, and refused by name otherwise.
"""

from __future__ import annotations

from typing import Any

from af3.config import (
    AF3Config,
    AudioConfig,
    ConfigError,
    TextConfig,
    is_int,
    is_number,
    require,
    require_dict,
)
from af3.frontend import (
    CHUNK_LENGTH,
    HOP_LENGTH,
    MAX_SECONDS,
    N_FFT,
    N_FRAMES,
    N_SAMPLES,
    SAMPLING_RATE,
)


def _optional(d: dict, key: str, default: Any, aliases: tuple[str, ...] = ()) -> Any:
    """d[key] (or the first of `aliases` present), not None; else `default`."""
    return next((d[k] for k in (key, *aliases) if d.get(k) is not None), default)


def audio_config(d: dict) -> AudioConfig:
    """From the `audio_config` part (a WhisperEncoder's config, old or new key names)."""
    w = "audio_config"
    return AudioConfig(
        num_mel_bins=require(d, "num_mel_bins", w),
        hidden_size=require(d, "hidden_size", w, ("d_model",)),
        num_hidden_layers=require(d, "num_hidden_layers", w, ("encoder_layers",)),
        num_attention_heads=require(d, "num_attention_heads", w, ("encoder_attention_heads",)),
        intermediate_size=require(d, "intermediate_size", w, ("encoder_ffn_dim",)),
        max_source_positions=_optional(d, "max_source_positions", N_FRAMES // 2),
        activation_function=_optional(d, "activation_function", "gelu"),
        scale_embedding=bool(_optional(d, "scale_embedding", False)),
    )


def text_config(d: dict) -> TextConfig:
    """From the `text_config` part (a Qwen2 config; RoPE's theta in either placement)."""
    w = "text_config"
    if d.get("use_sliding_window"):
        raise ConfigError(f"{w}: use_sliding_window=true is not supported (AF3 does not use it)")
    # Older files put rope_theta at the top level, newer ones inside rope_parameters.
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{w}: rope_parameters / rope_scaling must be an object, got {rope!r}")
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConfigError(f"{w}: rope type {rope.get('rope_type', rope.get('type'))!r} is not "
                          "supported (AF3 uses plain RoPE)")
    theta = rope.get("rope_theta", d.get("rope_theta"))
    if theta is None:
        raise ConfigError(f"{w}: required key 'rope_theta' (or rope_parameters.rope_theta) is missing")
    n_heads = require(d, "num_attention_heads", w)
    return TextConfig(
        vocab_size=require(d, "vocab_size", w),
        hidden_size=require(d, "hidden_size", w),
        intermediate_size=require(d, "intermediate_size", w),
        num_hidden_layers=require(d, "num_hidden_layers", w),
        num_attention_heads=n_heads,
        num_key_value_heads=_optional(d, "num_key_value_heads", n_heads),
        max_position_embeddings=require(d, "max_position_embeddings", w),
        rms_norm_eps=require(d, "rms_norm_eps", w),
        rope_theta=theta,
        tie_word_embeddings=bool(_optional(d, "tie_word_embeddings", False)),
        hidden_act=_optional(d, "hidden_act", "silu"),
        head_dim=_optional(d, "head_dim", 0),
    )


# What WhisperFeatureExtractor and AudioFlamingo3Processor store, and the value af3's fixed frontend
# has (af3.frontend): a file with any other value would be heard differently, so it is refused.
FRONTEND_SETTINGS = {"sampling_rate": SAMPLING_RATE, "n_fft": N_FFT, "hop_length": HOP_LENGTH,
                     "chunk_length": CHUNK_LENGTH, "n_samples": N_SAMPLES, "nb_max_frames": N_FRAMES}


def check_frontend(preprocessor: dict | None, num_mel_bins: int) -> None:
    """A `preprocessor_config.json` (or `processor_config.json`, which nests the feature extractor
    and adds `max_audio_len`) must describe af3's frontend and the encoder's mel bins."""
    w = "feature extractor"
    pre = preprocessor or {}
    if not isinstance(pre, dict):
        raise TypeError(f"preprocessor must be a dict, got {type(pre).__name__}")
    max_len = pre.get("max_audio_len", MAX_SECONDS)
    if not is_number(max_len) or max_len != MAX_SECONDS:
        raise ConfigError(f"{w}: max_audio_len is {max_len!r}; AF3 hears {MAX_SECONDS} s (af3.frontend)")
    fe = pre.get("feature_extractor", pre)
    if not isinstance(fe, dict):
        raise ConfigError(f"{w}: settings must be an object, got {type(fe).__name__} {fe!r}")
    for key, want in {**FRONTEND_SETTINGS, "feature_size": num_mel_bins}.items():
        value = fe.get(key, want)
        if not is_int(value) or value != want:
            also = " (the encoder's num_mel_bins)" if key == "feature_size" else " (af3.frontend)"
            raise ConfigError(f"{w}: {key} is {value!r}; af3's frontend is Whisper's, with {want}{also}")


def config_from_hf(config: dict, preprocessor: dict | None = None) -> AF3Config:
    """An HF `config.json` dict -> AF3Config; the feature-extractor settings, when present, are checked."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    audio = require_dict(config, "audio_config", "config.json")
    text = require_dict(config, "text_config", "config.json")
    dtype = _optional(config, "dtype", None, ("torch_dtype",))
    dtype = _optional(text, "dtype", "bfloat16", ("torch_dtype",)) if dtype is None else dtype
    cfg = AF3Config(
        audio=audio_config(audio),
        text=text_config(text),
        audio_token_id=_optional(config, "audio_token_id", 151669, ("audio_token_index",)),
        projector_hidden_act=_optional(config, "projector_hidden_act", "gelu"),
        projector_bias=bool(_optional(config, "projector_bias", True)),
        dtype=str(dtype).replace("torch.", ""),
    )
    check_frontend(preprocessor, cfg.audio.num_mel_bins)
    return cfg
