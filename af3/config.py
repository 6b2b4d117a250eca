"""Model dimensions: one flat dataclass per part, checked, saved beside the weights as af3's own
versioned config.json and read back from it.

Field names follow the HF `config.json` names so that a reader can map one onto the other;
reading an HF config.json is the converter's job (weights_convert/hf_config.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from af3.frontend import (
    CHUNK_LENGTH,
    HOP_LENGTH,
    MAX_WINDOWS,
    N_FFT,
    N_FRAMES,
    N_MELS,
    SAMPLING_RATE,
)
from af3.jsonfile import parse_json

# The dtypes a checkpoint is saved and run in, by torch's names; short forms af3.load also takes.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_SHORT_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

FORMAT = "af3"  # the "format" key of our config.json: what tells it apart from an HF one
FORMAT_VERSION = 2  # bump when the JSON we write changes incompatibly
# Version 1 also stored the audio frontend's settings ("frontend"), which never could vary: version 1
# files are read, their "frontend" checked to be af3.frontend's constants (FRONTEND_V1).
READ_VERSIONS = (1, 2)
FRONTEND_V1 = {"sampling_rate": SAMPLING_RATE, "n_fft": N_FFT, "hop_length": HOP_LENGTH,
               "chunk_length": CHUNK_LENGTH, "max_windows": MAX_WINDOWS}  # and num_mel_bins = audio's
# The mel filter bank, (N_FFT // 2 + 1, num_mel_bins) float64, follows from the config alone
# (AF3's: 0.2 MB): a num_mel_bins asking for more than this is refused when the config is read,
# before anything is allocated.
MAX_MEL_FILTER_BYTES = 2**30


def is_af3_config(d: Any) -> bool:
    """Whether a parsed config.json is ours (any format_version), not an HF or other one."""
    return isinstance(d, dict) and d.get("format") == FORMAT


class ConfigError(ValueError):
    """A config value is missing, malformed or inconsistent."""


def require(d: dict, key: str, where: str, aliases: tuple[str, ...] = ()) -> Any:
    """d[key] (or the first of `aliases` present), not None; else a ConfigError naming them."""
    for k in (key, *aliases):
        if d.get(k) is not None:
            return d[k]
    names = " / ".join(repr(k) for k in (key, *aliases))
    raise ConfigError(f"{where}: required key {names} is missing")


def require_dict(d: dict, key: str, where: str) -> dict:
    """d[key], which must be a JSON object."""
    sub = require(d, key, where)
    if not isinstance(sub, dict):
        raise ConfigError(f"{where}: {key!r} must be an object, got {type(sub).__name__} {sub!r}")
    return sub


@dataclass
class AudioConfig:
    """The Whisper-style audio encoder."""

    num_mel_bins: int = N_MELS
    hidden_size: int = 1280  # HF: d_model
    num_hidden_layers: int = 32  # HF: encoder_layers
    num_attention_heads: int = 20  # HF: encoder_attention_heads
    intermediate_size: int = 5120  # HF: encoder_ffn_dim
    max_source_positions: int = N_FRAMES // 2  # positions after conv2 (stride 2): 1500, fixed by the frontend
    activation_function: str = "gelu"
    scale_embedding: bool = False
    layer_norm_eps: float = 1e-5
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        _check_types(self)
        _positive(self, "num_mel_bins", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "max_source_positions")
        _positive_number(self, "layer_norm_eps")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"audio: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        self.head_dim = self.hidden_size // self.num_attention_heads
        if self.max_source_positions != N_FRAMES // 2:
            raise ConfigError(f"audio: a {CHUNK_LENGTH} s window gives {N_FRAMES // 2} encoder positions but "
                              f"max_source_positions is {self.max_source_positions}")
        filter_bytes = (N_FFT // 2 + 1) * self.num_mel_bins * 8
        if filter_bytes > MAX_MEL_FILTER_BYTES:
            raise ConfigError(f"audio: num_mel_bins {self.num_mel_bins:,} (the mel filter bank) would take "
                              f"{filter_bytes:,} bytes (at most {MAX_MEL_FILTER_BYTES:,} are accepted)")
        if self.activation_function != "gelu":
            raise ConfigError(f"audio: activation_function {self.activation_function!r} is not "
                              "supported (AF3 uses 'gelu')")

@dataclass
class TextConfig:
    """The Qwen2 decoder."""

    vocab_size: int = 151672
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    n_rep: int = field(init=False)  # query heads per key/value head (GQA)

    def __post_init__(self) -> None:
        _check_types(self)
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        _positive_number(self, "rms_norm_eps", "rope_theta")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"text: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"text: num_attention_heads {self.num_attention_heads} is not "
                              f"divisible by num_key_value_heads {self.num_key_value_heads}")
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim < 0 or self.head_dim % 2:
            raise ConfigError(f"text: head_dim {self.head_dim} must be even (RoPE) and positive")
        if self.hidden_act != "silu":
            raise ConfigError(f"text: hidden_act {self.hidden_act!r} is not supported (Qwen2 uses 'silu')")
        self.n_rep = self.num_attention_heads // self.num_key_value_heads

QUANT_SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)  # sizes the int4 kernels take, within the 32-128 we support
DEFAULT_INT4_GROUP_SIZE = 128  # the size that keeps the whole real decoder under 0.33x bf16 (README)


@dataclass
class QuantConfig:
    """How the decoder's linear weights are stored: "int8" (per output channel) or "int4"
    (groups of `group_size` inputs). See af3/quant.py for the tensor names."""

    scheme: str
    group_size: int | None = None  # int4 only

    def __post_init__(self) -> None:
        if self.scheme not in QUANT_SCHEMES:
            raise ConfigError(f"quantization scheme {self.scheme!r} is not one of {', '.join(QUANT_SCHEMES)}")
        if self.scheme == "int8" and self.group_size is not None:
            raise ConfigError(f"int8 has one scale per output channel: group_size must be null, got "
                              f"{self.group_size!r}")
        if self.scheme == "int4":
            if self.group_size is None:
                self.group_size = DEFAULT_INT4_GROUP_SIZE
            if not is_int(self.group_size) or self.group_size not in INT4_GROUP_SIZES:
                raise ConfigError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got "
                                  f"{self.group_size!r}")

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "group_size": self.group_size}


@dataclass
class AF3Config:
    """The whole model: encoder + projector + decoder (the frontend that feeds it: af3.frontend)."""

    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    audio_token_id: int = 151669
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    dtype: str = "bfloat16"  # the dtype the checkpoint was saved in (its floating-point part)
    quantization: QuantConfig | None = None  # None: every weight is floating point

    def __post_init__(self) -> None:
        _check_types(self)
        if self.quantization is not None and not isinstance(self.quantization, QuantConfig):
            raise ConfigError(f"quantization must be a QuantConfig or None, got {self.quantization!r}")
        if not 0 <= self.audio_token_id < self.text.vocab_size:
            raise ConfigError(f"audio_token_id {self.audio_token_id} is outside the vocabulary "
                              f"(vocab_size {self.text.vocab_size})")
        if self.projector_hidden_act != "gelu":
            raise ConfigError(f"projector_hidden_act {self.projector_hidden_act!r} is not supported "
                              "(AF3 uses 'gelu')")
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    def to_dict(self) -> dict:
        def part(obj: Any) -> dict:
            return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "audio": part(self.audio),
            "text": part(self.text),
            "audio_token_id": self.audio_token_id,
            "projector_hidden_act": self.projector_hidden_act,
            "projector_bias": self.projector_bias,
            "dtype": self.dtype,
            # Written only when set, so float checkpoints keep the config older af3 versions read.
            **({"quantization": self.quantization.to_dict()} if self.quantization else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> AF3Config:
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        if not is_af3_config(d):
            raise ConfigError("not an af3 config (no \"format\": \"af3\"); an HF config.json must be "
                              "converted with `python -m weights_convert SRC DST`")
        version = d.get("format_version")
        if version not in READ_VERSIONS:
            newer = is_int(version) and version > FORMAT_VERSION
            hint = ("; it was written by a newer af3: upgrade af3, or convert the original checkpoint "
                    "again with this af3's weights_convert" if newer else "")
            raise ConfigError(f"config format_version {version!r} is not supported by this af3 "
                              f"(expects {FORMAT_VERSION}){hint}")

        def part(klass: type, key: str) -> Any:
            sub = require_dict(d, key, "config")
            known = {f.name for f in dataclasses.fields(klass) if f.init}
            unknown = sorted(set(sub) - known)
            if unknown:
                raise ConfigError(f"config.{key}: unknown keys {unknown}")
            return klass(**sub)

        top = {"format", "format_version", "audio", "text", "audio_token_id",
               "projector_hidden_act", "projector_bias", "dtype", "quantization"}
        unknown = sorted(set(d) - top - ({"frontend"} if version == 1 else set()))
        if unknown:
            raise ConfigError(f"config: unknown keys {unknown}")
        audio = part(AudioConfig, "audio")
        if version == 1:
            _check_frontend_v1(require_dict(d, "frontend", "config"), audio.num_mel_bins)
        return cls(
            audio=audio,
            text=part(TextConfig, "text"),
            audio_token_id=require(d, "audio_token_id", "config"),
            projector_hidden_act=require(d, "projector_hidden_act", "config"),
            projector_bias=require(d, "projector_bias", "config"),
            dtype=require(d, "dtype", "config"),
            quantization=_quantization(d.get("quantization")),
        )

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> AF3Config:
        """Read our config.json; every problem is a ConfigError (a ValueError) naming the file."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            d = parse_json(Path(path).read_bytes(), str(path))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def _check_frontend_v1(frontend: dict, num_mel_bins: int) -> None:
    """A version 1 config's "frontend": af3 only ever wrote Whisper's constants there."""
    want = {**FRONTEND_V1, "num_mel_bins": num_mel_bins}
    unknown = sorted(set(frontend) - set(want))
    if unknown:
        raise ConfigError(f"config.frontend: unknown keys {unknown}")
    for key, value in frontend.items():
        if not is_int(value) or value != want[key]:
            raise ConfigError(f"config.frontend: {key} is {value!r}, but af3's frontend is Whisper's, fixed "
                              f"at {want[key]} (af3.frontend)")


def _quantization(d: Any) -> QuantConfig | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ConfigError(f"config.quantization must be an object, got {type(d).__name__} {d!r}")
    unknown = sorted(set(d) - {"scheme", "group_size"})
    if unknown:
        raise ConfigError(f"config.quantization: unknown keys {unknown}")
    if "scheme" not in d:
        raise ConfigError("config.quantization: required key 'scheme' is missing")
    return QuantConfig(d["scheme"], d.get("group_size"))


def is_int(v: Any) -> bool:
    """An int and not a bool (True is an int to Python, never a count or an id here)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_integer(v: Any) -> bool:
    """`is_int`, numpy's integer scalars included (an id taken from an array): for values that are
    converted with int() where they enter, never for values stored in a config."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    """A real number (an int, a float, or numpy's scalar of either) and not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float, and not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_KINDS = {"int": (is_int, "an integer"), "float": (is_number, "a finite number"),
          "bool": (lambda v: isinstance(v, bool), "true or false"),
          "str": (lambda v: isinstance(v, str), "a string")}


def _check_types(obj: Any) -> None:
    """Every int / float / bool / str field holds that type (a JSON "48" or null is refused)."""
    where = type(obj).__name__
    for f in dataclasses.fields(obj):
        kind = _KINDS.get(f.type) if f.init else None  # f.type is a string (postponed annotations)
        if kind is None:
            continue
        v = getattr(obj, f.name)
        if not kind[0](v):
            raise ConfigError(f"{where}.{f.name} must be {kind[1]}, got {v!r}")
        if f.type == "float":
            setattr(obj, f.name, float(v))


def _positive_number(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) <= 0:
            raise ConfigError(f"{type(obj).__name__}.{n} must be positive, got {getattr(obj, n)!r}")


def _positive(obj: Any, *names: str) -> None:
    where = type(obj).__name__
    for n in names:
        v = getattr(obj, n)
        if not is_int(v) or v <= 0:
            raise ConfigError(f"{where}.{n} must be a positive integer, got {v!r}")


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write `data` as indented JSON, atomically: a temporary file beside `path`, then a rename,
    so an interrupted write never leaves a half-written file."""
    path = Path(path)
    text = json.dumps(data, indent=2) + "\n"  # a value JSON cannot hold fails here, before any file
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
