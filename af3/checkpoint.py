"""af3.load: an af3-layout checkpoint directory -> a ready bundle (model, processor, tokenizer).

The model is built on the meta device (no memory), then every parameter is assigned a tensor
read from safetensors. `safe_open` memory-maps the file, so a tensor that needs no cast and
stays on the CPU is used in place (copy-on-write pages of the file) and the weights are never
held twice. A cast or a move makes one new tensor per weight; the source pages are released
when its file is closed, which happens shard by shard.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open

from af3.config import AF3Config

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def load(path: str | os.PathLike, device: str | torch.device = "cpu",
         dtype: torch.dtype | str | None = None):
    """Load an af3 checkpoint directory into an `af3.bundle.AF3` (model in eval mode).

    `dtype` defaults to the dtype the checkpoint was saved in; `device` is where the weights go.
    HF- and NVIDIA-layout directories are refused with the `weights_convert` command to run.
    """
    from af3.bundle import AF3
    from af3.generation import GenerationConfig
    from af3.processor import Processor
    from af3.tokenizer import Tokenizer

    root = _checkpoint_dir(path)
    config = AF3Config.load(root / "config.json")
    dtype = _resolve_dtype(config.dtype if dtype is None else dtype)
    device = torch.device(device)

    model = load_model(root, config, device=device, dtype=dtype)
    generation_config = GenerationConfig.load(root / "generation_config.json")
    model.generation_config = generation_config
    tokenizer = Tokenizer.from_file(root / "tokenizer.json")
    processor = Processor(tokenizer, config.frontend, max_length=config.text.max_position_embeddings)
    return AF3(model=model, processor=processor, tokenizer=tokenizer, config=config,
               generation_config=generation_config)


def load_model(root: str | os.PathLike, config: AF3Config, *, device: torch.device,
               dtype: torch.dtype) -> torch.nn.Module:
    """Build AudioFlamingo3(config) on the meta device and assign the checkpoint's tensors."""
    from af3.model import AudioFlamingo3

    root = Path(root)
    with torch.device("meta"):
        model = AudioFlamingo3(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    files = weight_files(root)

    # Check every name and shape from the headers before reading any data.
    found: dict[str, tuple[int, ...]] = {}
    for file, names in files.items():
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if names is not None and name not in names:
                    raise ValueError(f"{file}: tensor {name!r} is not listed for this file in {INDEX_NAME}")
                found[name] = tuple(f.get_slice(name).get_shape())
    check_state(found, expected, f"checkpoint {root}")

    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                t = f.get_tensor(name)
                state[name] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    _check_nothing_on_meta(model)
    return model.eval()


def weight_files(root: Path) -> dict[Path, set[str] | None]:
    """Shard path -> the names the index lists for it (None for a single model.safetensors)."""
    index = root / INDEX_NAME
    if index.is_file():
        import json

        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (no weight_map: {e})") from None
        files: dict[Path, set[str] | None] = {}
        for name, file in weight_map.items():
            path = (root / str(file)).resolve()
            if path.parent != root.resolve():
                raise ValueError(f"{index}: shard {file!r} is not a file inside {root}")
            if not path.is_file():
                raise FileNotFoundError(f"{index} lists {file}, which is missing")
            files.setdefault(path, set()).add(name)
        return files
    single = root / WEIGHTS_NAME
    if not single.is_file():
        raise FileNotFoundError(f"{root}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")
    return {single: None}


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {root}")
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory (af3.load wants a checkpoint directory)")
    command = f"python -m weights_convert {_quote(root)} {_quote(Path(str(root).rstrip('/') + '-af3'))}"
    if all((root / p).is_dir() for p in ("llm", "sound_tower", "sound_mm_projector")):
        raise ValueError(f"{root} is NVIDIA's original AF3 layout; convert it first:\n    {command}\n"
                         "then af3.load the new directory")
    config = root / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: {root} is not an af3 checkpoint directory")
    import json

    try:
        d = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{config}: not valid JSON ({e})") from None
    if isinstance(d, dict) and d.get("format") != "af3" and "audio_config" in d:
        raise ValueError(f"{root} is a Hugging Face checkpoint; convert it first:\n    {command}\n"
                         "then af3.load the new directory")
    return root


def _quote(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        return _DTYPES[dtype.removeprefix("torch.")]
    raise TypeError(f"dtype must be a torch.dtype or a str, got {type(dtype).__name__}")


def check_state(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                what: str) -> None:
    """One ValueError naming the missing, unexpected and mis-shaped tensors of `what`."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_some(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} with the wrong shape: " + _some(
            [f"{k} {list(found[k])} (config wants {list(expected[k])})" for k in shapes]))
    if problems:
        raise ValueError(f"{what} does not match the config: " + "; ".join(problems))


def _some(items: list[str], n: int = 8) -> str:
    more = f", … ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _check_nothing_on_meta(model: torch.nn.Module) -> None:
    """A tensor outside the state dict (a non-persistent buffer) would still be on meta here.

    AudioFlamingo3 has none (RoPE angles are computed per call, the KV cache is made by
    `new_cache`); this keeps it that way rather than failing later inside a forward pass.
    """
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise ValueError(f"after loading, {len(on_meta)} tensors of the model are still unset: "
                         f"{_some(on_meta)}")
