"""An HF AudioFlamingo3 `config.json` (and its feature-extractor settings) -> af3's AF3Config.

Reading transformers' files is conversion's job: af3 itself reads only its own config.json
(af3/config.py), which `python -m weights_convert` writes. transformers has spelled the same
facts several ways over its versions, and this module knows each: RoPE's theta at the top of
`text_config` or inside `rope_parameters` (`rope_scaling` before that), `dtype` or `torch_dtype`
(on the whole config or on `text_config`), Whisper's `d_model` / `encoder_layers` /
`encoder_attention_heads` / `encoder_ffn_dim`, and `audio_token_index`. A field missing or of
the wrong type is a ConfigError naming it; the dataclasses of af3/config.py then check the values.
"""

from __future__ import annotations

from typing import Any

from af3.config import (
    AF3Config,
    AudioConfig,
    ConfigError,
    FrontendConfig,
    TextConfig,
    is_int,
    is_number,
    require,
    require_dict,
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
        max_source_positions=_optional(d, "max_source_positions", 1500),
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


def frontend_config(d: dict, max_audio_len: float | None = None) -> FrontendConfig:
    """From a `preprocessor_config.json` (or the `feature_extractor` part of a processor config)."""
    w = "feature extractor"
    if not isinstance(d, dict):
        raise ConfigError(f"{w}: settings must be an object, got {type(d).__name__} {d!r}")
    chunk = _optional(d, "chunk_length", 30)
    if not is_int(chunk) or chunk <= 0:
        raise ConfigError(f"{w}: chunk_length must be a positive integer (seconds), got {chunk!r}")
    if max_audio_len is None:
        max_windows = 20
    elif not is_number(max_audio_len) or max_audio_len < chunk:
        raise ConfigError(f"{w}: max_audio_len must be a number of seconds of at least one "
                          f"{chunk} s window, got {max_audio_len!r}")
    else:
        max_windows = int(max_audio_len // chunk)
    return FrontendConfig(
        sampling_rate=_optional(d, "sampling_rate", 16000),
        n_fft=_optional(d, "n_fft", 400),
        hop_length=_optional(d, "hop_length", 160),
        num_mel_bins=_optional(d, "feature_size", 128, ("num_mel_bins",)),
        chunk_length=chunk,
        max_windows=max_windows,
    )


def config_from_hf(config: dict, preprocessor: dict | None = None) -> AF3Config:
    """An HF `config.json` dict and, when present, the feature-extractor settings -> AF3Config."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    audio = require_dict(config, "audio_config", "config.json")
    text = require_dict(config, "text_config", "config.json")
    pre = preprocessor or {}
    if not isinstance(pre, dict):
        raise TypeError(f"preprocessor must be a dict, got {type(pre).__name__}")
    max_len = pre.get("max_audio_len")
    if "feature_extractor" in pre:  # processor_config.json nests it
        pre = pre["feature_extractor"]
    dtype = _optional(config, "dtype", None, ("torch_dtype",))
    dtype = _optional(text, "dtype", "bfloat16", ("torch_dtype",)) if dtype is None else dtype
    return AF3Config(
        audio=audio_config(audio),
        text=text_config(text),
        frontend=frontend_config(pre, max_len),
        audio_token_id=_optional(config, "audio_token_id", 151669, ("audio_token_index",)),
        projector_hidden_act=_optional(config, "projector_hidden_act", "gelu"),
        projector_bias=bool(_optional(config, "projector_bias", True)),
        dtype=str(dtype).replace("torch.", ""),
    )
