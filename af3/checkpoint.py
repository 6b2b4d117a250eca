"""Finding, checking and reading the weights of an af3-layout checkpoint directory
(`af3.bundle.load` assembles the bundle around the model this builds).

The model is built on the meta device (no memory), then every parameter is assigned a tensor
read from safetensors. `safe_open` memory-maps the file, so a tensor that needs no cast and
stays on the CPU is used in place (copy-on-write pages of the file) and the weights are never
held twice. A cast or a move makes one new tensor per weight; the source pages are released
when its file is closed, which happens shard by shard.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from af3.config import (
    DTYPE_NAMES,
    DTYPE_SHORT_NAMES,
    AF3Config,
    QuantConfig,
    is_af3_config,
    is_int,
)
from af3.jsonfile import parse_json
from af3.limits import check_layer_counts
from af3.qwen2 import merged_parts, parameter_names

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights never read: unpickling runs code
# dtype name (long or short) -> torch dtype.
DTYPES = {**{name: getattr(torch, name) for name in DTYPE_NAMES},
          **{short: getattr(torch, name) for short, name in DTYPE_SHORT_NAMES.items()}}
# Floating dtypes the model runs in (float64 too, for precision checks; float8 types are not).
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FLOAT_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}  # the same, as safetensors headers spell them: bytes
_INT_DTYPES = {"I8": torch.int8, "U8": torch.uint8}  # quantized weights (af3/quant.py)
# af3.load shows progress by default for checkpoints this large, when stderr is a terminal.
PROGRESS_MIN_BYTES = 10**9
Progress = Callable[[int, int, int, int], None]  # (tensors done, tensors, bytes done, bytes)


def quant_config(quantize: str | None, group_size: int | None = None) -> QuantConfig | None:
    """af3.load's `quantize` / `group_size` arguments -> a QuantConfig (None: no quantization)."""
    if quantize is None:
        if group_size is not None:
            raise ValueError("group_size is for quantize='int4'; pass quantize='int4' too")
        return None
    if not isinstance(quantize, str):
        raise TypeError(f"quantize must be 'int8', 'int4' or None, got {type(quantize).__name__}")
    return QuantConfig(quantize, group_size)


def load_model(root: str | os.PathLike, config: AF3Config, *, device: torch.device,
               dtype: torch.dtype, progress: bool | Progress | None = False,
               quantize: QuantConfig | None = None) -> torch.nn.Module:
    """Build AudioFlamingo3(config) on the meta device and assign the checkpoint's tensors.

    `progress` as in `load`; `quantize`: quantize a float checkpoint's decoder linears on the
    way in (a checkpoint converted with --quantize says so in its config and needs nothing)."""
    from af3 import quant
    from af3.model import AudioFlamingo3
    from weights_convert.safetensors_io import (  # (it imports this module)
        read_header,
        read_tensor,
    )

    root = Path(root)
    files = weight_files(root)
    # Every name, shape and dtype from the headers, before any data is read, and the layer counts
    # before the model is built: a crafted num_hidden_layers never builds a layer.
    found: dict[str, tuple[int, ...]] = {}
    stored: dict[str, str] = {}
    for file, listed in files.items():
        with _open(file) as f:
            check_shard(file, f.keys(), listed)
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = f.get_slice(name)
                found[name], stored[name] = tuple(sl.get_shape()), sl.get_dtype()
    check_layer_counts(config, found, f"checkpoint {root}")

    with torch.device("meta"):
        model = AudioFlamingo3(config)
    if config.quantization is not None:  # the files hold the quantized layers' own tensors
        if quantize is not None and quantize != config.quantization:
            raise ValueError(f"checkpoint {root} is already quantized ({_scheme(config.quantization)}); "
                             f"it cannot be quantized again to {_scheme(quantize)}: load it without "
                             "quantize=, or quantize the float checkpoint it came from")
        quantize = None
        quant.replace_linears(model, config.quantization)
    meta_state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in meta_state.items()}
    want_dtype = {k: v.dtype for k, v in meta_state.items()}
    not_float: list[str] = []
    not_quantized: list[str] = []
    total_bytes = 0
    for name, kind in stored.items():
        want = want_dtype.get(name, torch.float32)
        if want.is_floating_point and kind not in _FLOAT_BYTES:
            not_float.append(f"{name} ({kind})")
        elif not want.is_floating_point and _INT_DTYPES.get(kind) != want:
            not_quantized.append(f"{name} ({kind}, wants {str(want).removeprefix('torch.')})")
        total_bytes += math.prod(found[name]) * _FLOAT_BYTES.get(kind, 1)
    check_state(found, expected, f"checkpoint {root}")
    if not_float:  # every float parameter of AudioFlamingo3 must be stored as floating point
        raise ValueError(f"checkpoint {root}: {len(not_float)} tensors are not floating-point: "
                         f"{_some(not_float)}; re-convert it with weights_convert")
    if not_quantized:  # a quantized layer's weight must be exactly its integer type
        raise ValueError(f"checkpoint {root}: {len(not_quantized)} tensors have the wrong dtype for its "
                         f"{_scheme(config.quantization)} quantization: {_some(not_quantized)}; "
                         "re-convert it with weights_convert")
    on_the_fly = set(quant.replace_linears(model, quantize)) if quantize is not None else set()
    params = parameter_names(model)  # cast to `dtype`; buffers keep theirs

    report = _progress_reporter(progress, total_bytes)
    parts = merged_parts(model)
    state: dict[str, torch.Tensor] = {}
    done = done_bytes = 0
    try:
        for file in files:
            with _open(file) as f, open(file, "rb") as raw:
                headers = read_header(file)
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    # safe_open maps the file. A merged linear's parts are copied into it, and the
                    # int8/int4 kernels copy weights that are not 64-byte aligned: those are read
                    # into memory of their own instead, so that no page of the file stays mapped
                    # for them beside their copy.
                    own = _module(name) in parts or not want_dtype.get(name, torch.float32).is_floating_point
                    t = read_tensor(raw, headers[name]) if own else f.get_tensor(name)
                    done += 1
                    done_bytes += t.nbytes
                    if name in on_the_fly:
                        prefix = name.removesuffix("weight")
                        for suffix, q in quant.quantize_weight(t.to(device), quantize).items():
                            state[prefix + suffix] = q
                            _join(state, prefix + suffix, parts)
                    else:
                        state[name] = t.to(device=device, dtype=dtype if name in params else want_dtype[name])
                        _join(state, name, parts)
                    del t
                    if report is not None:
                        report(done, len(found), done_bytes, total_bytes)
    finally:
        if report is not None and hasattr(report, "end_line"):
            report.end_line()
    model.load_state_dict(state, strict=True, assign=True)
    del state
    _check_nothing_on_meta(model)
    if quantize is not None:
        config.quantization = quantize  # the model in memory is quantized now; its config says so
    quant.pack_for_kernels(model)
    return model.eval()


def _scheme(qc: QuantConfig) -> str:
    return qc.scheme if qc.group_size is None else f"{qc.scheme}, group size {qc.group_size}"


def _progress_reporter(progress: bool | Progress | None, total_bytes: int) -> Progress | None:
    if progress is None:
        progress = total_bytes >= PROGRESS_MIN_BYTES and sys.stderr.isatty()
    if progress is True:
        from af3.progress import TensorProgress

        return TensorProgress(label="af3.load: ")
    return progress or None


def weight_files(root: Path) -> dict[Path, set[str] | None]:
    """The safetensors files of the checkpoint in folder `root`, in file-name order: shard path ->
    the tensor names the index lists for it, or {model.safetensors: None} without an index.

    The one reader of a safetensors index, for af3.load and for weights_convert (any layout).
    Shard names are checked by `shard_path`; pickle-only folders are refused, not read.
    """
    index = root / INDEX_NAME
    if index.is_file():
        try:
            weight_map = parse_json(index.read_bytes(), str(index))["weight_map"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (no weight_map: {e})") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map is a {type(weight_map).__name__}, not an object "
                             "of tensor name -> file name")
        if not weight_map:
            raise ValueError(f"{index}: weight_map is empty: it lists no tensors")
        files: dict[Path, set[str]] = {}
        for name, file in weight_map.items():
            path = shard_path(root, file, index)
            if not path.is_file():
                raise FileNotFoundError(f"{index} lists {file}, which is missing")
            files.setdefault(path, set()).add(name)
        return dict(sorted(files.items()))
    single = root / WEIGHTS_NAME
    if single.is_file():
        return {single: None}
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES) if root.is_dir() else []
    if pickles:
        raise ValueError(f"{root} holds only pickle weights ({', '.join(pickles[:3])}); they are not "
                         "read, for safety. Save them as safetensors first "
                         "(e.g. transformers' save_pretrained(safe_serialization=True))")
    raise FileNotFoundError(f"{root}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")


def check_shard(file: Path, names: Iterable[str], listed: set[str] | None) -> None:
    """The tensors `file` holds are exactly the ones the index lists for it (`listed`; None: no index)."""
    if listed is None:
        return
    names = set(names)
    extra = sorted(names - listed)
    if extra:
        raise ValueError(f"{file}: tensor {extra[0]!r} is not listed for this file in {INDEX_NAME}")
    missing = sorted(listed - names)
    if missing:
        raise ValueError(f"{file.parent / INDEX_NAME} lists {len(missing)} tensors for {file.name} that it does "
                         f"not hold, first {missing[0]!r}")


def shard_path(folder: Path, file: object, index: Path) -> Path:
    """Where the shard `file` named in `index` is, checked to be a file of the checkpoint.

    The name must be a plain file name in `folder`. It may be a link (the HF hub cache keeps
    `snapshots/<rev>/*` as links into `../../blobs/`), but only to a file inside the repository
    folder that holds the snapshot (`folder` itself outside a hub cache): an index cannot make
    the loader read any other file on the machine.
    """
    if isinstance(file, str) and "\0" in file:
        raise ValueError(f"{index}: weight_map: shard name {file!r} holds a NUL character")
    if not isinstance(file, str) or file in ("", ".", "..") or Path(file).name != file or "\\" in file:
        raise ValueError(f"{index}: shard {file!r} is not a file inside {folder}")
    folder = folder.resolve()
    repo = folder.parent.parent if folder.parent.name == "snapshots" else folder
    path = (folder / file).resolve()
    if not path.is_relative_to(repo):
        raise ValueError(f"{index}: shard {file!r} is a link to {path}, outside {repo}; a shard must be a "
                         "file of the checkpoint")
    return path


def checkpoint_dir(path: str | os.PathLike) -> Path:
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
    d = parse_json(config.read_bytes(), str(config))
    if isinstance(d, dict) and not is_af3_config(d) and "audio_config" in d:
        raise ValueError(f"{root} is a Hugging Face checkpoint; convert it first:\n    {command}\n"
                         "then af3.load the new directory")
    return root


def _open(file: Path):
    """safe_open, with a damaged file reported as a ValueError that names it."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{file}: not a valid safetensors file ({e}); the file is damaged or "
                         "truncated: convert the checkpoint again") from None


def _quote(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))


def resolve_device(device: str | torch.device) -> torch.device:
    """A device that exists here; torch's own errors (no driver, bad string) become ValueErrors."""
    if not isinstance(device, (str, torch.device)):
        hint = f" (for GPU {device} write 'cuda:{device}')" if is_int(device) else ""
        raise TypeError(f"device must be a str or torch.device such as 'cpu' or 'cuda', got "
                        f"{type(device).__name__} {device!r}{hint}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {str(device)!r} is not a device name torch knows; use 'cpu', "
                         f"'cuda', 'cuda:1', 'mps', ... ({_first_line(e, 60)})") from None
    if dev.type == "meta":
        raise ValueError("device 'meta' holds no data; load the weights onto 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available here "
                             "(torch.cuda.is_available() is False); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s), numbered from 0")
        return dev
    try:
        torch.empty(0, device=dev)
    except Exception as e:  # noqa: BLE001 (backends fail with RuntimeError, AssertionError, ...)
        raise ValueError(f"device {str(device)!r} is not available here: {_first_line(e)}") from None
    return dev


def _first_line(e: BaseException, limit: int = 160) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= limit else line[:limit] + "…"


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be a floating-point dtype ({', '.join(map(str, _FLOAT_DTYPES))}), "
                             f"got {dtype}")
        return dtype
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return DTYPES[dtype.removeprefix("torch.")]
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


def _module(name: str) -> str:
    return name.rpartition(".")[0]


def _join(state: dict[str, torch.Tensor], name: str, parts: dict[str, tuple[str, int, int, int]]) -> None:
    """Move the tensor `name` of a merged linear's part (attn.q.weight of attn.qkv.weight, say)
    into its rows of the merged tensor in `state`, made when its first part arrives: a part is
    held twice only while it is copied, never the model's merged weights."""
    if _module(name) not in parts:
        return
    merged, start, stop, rows = parts[_module(name)]
    key = f"{merged}.{name.rpartition('.')[2]}"
    part = state.pop(name)
    if key not in state:
        state[key] = part.new_empty((rows, *part.shape[1:]))
    state[key][start:stop] = part


def _check_nothing_on_meta(model: torch.nn.Module) -> None:
    """A tensor outside the state dict (a non-persistent buffer) would still be on meta here.

    AudioFlamingo3 has none (RoPE angles are computed per call, the KV cache is made by
    `new_cache`); this keeps it that way rather than failing later inside a forward pass.
    """
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise ValueError(f"after loading, {len(on_meta)} tensors of the model are still unset: "
                         f"{_some(on_meta)}")
