"""Convert an HF- or NVIDIA-layout AF3 checkpoint into af3's layout, one tensor at a time.

Steps: read SRC's headers and config; map every tensor name (names.py) and check the result
against the state dict of `AudioFlamingo3(config)` built on the meta device; plan the output
shards; stream each tensor (read, merge LoRA, cast, write) into a temporary directory beside
DST; re-read every written header and check it against the plan; rename into place.
Nothing is written to DST itself until everything has been checked.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from af3 import quant
from af3.checkpoint import (
    DTYPES,
    INDEX_NAME,
    WEIGHTS_NAME,
    check_shard,
    check_state,
    quant_config,
    weight_files,
)
from af3.config import DTYPE_NAMES as CONFIG_DTYPES
from af3.config import (
    DTYPE_SHORT_NAMES,
    AF3Config,
    ConfigError,
    QuantConfig,
    is_af3_config,
    is_int,
)
from af3.generation import GenerationConfig
from af3.jsonfile import read_json_file
from af3.limits import check_layer_counts
from af3.progress import format_size
from weights_convert import hf_files
from weights_convert.hf_config import config_from_hf
from weights_convert.layouts import Source, open_source, read_json
from weights_convert.lora import LoraAdapter
from weights_convert.names import hf_to_af3
from weights_convert.safetensors_io import (
    DTYPE_NAMES,
    PlannedTensor,
    ShardWriter,
    TensorInfo,
    plan_shards,
    read_tensor,
    shard_file_names,
)

DTYPE_CHOICES = {"keep": None, **{short: DTYPES[short] for short in DTYPE_SHORT_NAMES}}  # bf16, fp16, fp32
# Every file a conversion writes: --force replaces a folder holding only these, nothing else.
WRITTEN_FILES = ("config.json", "tokenizer.json", "generation_config.json", INDEX_NAME, WEIGHTS_NAME)
_WRITTEN_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
LM_HEAD = "decoder.lm_head.weight"
EMBED = "decoder.embed_tokens.weight"

# progress(tensors_done, tensors_total, bytes_done, bytes_total)
Progress = Callable[[int, int, int, int], None]


def expected_shapes(config: AF3Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every persistent tensor of AudioFlamingo3(config), built without memory."""
    from af3.model import (
        AudioFlamingo3,  # the model is only needed for its tensor names
    )

    with torch.device("meta"):
        model = AudioFlamingo3(config)
    if config.quantization is not None:
        quant.replace_linears(model, config.quantization)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "keep",
            adapter: str | os.PathLike | None = None, max_shard_size: int = 2 * 10**9,
            force: bool = False, progress: Progress | None = None, quantize: str | None = None,
            group_size: int | None = None) -> str:
    """Convert SRC into af3's layout at DST; returns a one-line summary.

    `quantize` ("int8" or "int4" with `group_size`) stores the decoder's linear weights and
    LM head quantized (af3/quant.py); `dtype` is then that of everything else."""
    t0 = time.monotonic()
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPE_CHOICES)}")
    if not is_int(max_shard_size) or max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
    qc = quant_config(quantize, group_size)
    src, dst = Path(src), Path(dst)
    source = open_source(src)
    _check_destination(src, dst, force)
    cleaned = remove_dead_partials(dst)
    try:
        if source.kind == "af3":
            config = AF3Config.from_dict(source.config)
        else:
            config = config_from_hf(source.config, source.preprocessor)
    except ConfigError as e:
        raise ConfigError(f"{src} ({source.kind} layout), its config: {e}") from None
    if config.quantization is not None:
        # Rounding cannot be undone: a float checkpoint made from this one would pass for the original.
        raise ValueError(f"{src} is already quantized ({config.quantization.scheme}); it cannot be "
                         "converted again or back to floating point: convert the float checkpoint "
                         "it was made from")
    _check_tokenizer(source.tokenizer, config)
    _check_settings(source)
    generation, note = _generation_config(source)  # parsed now, so a bad one fails before the long part
    notes = [note, *cleaned]
    dropout = hf_files.training_only_settings(source.config)
    if dropout:
        notes.append(f"ignored, as af3 trains without dropout: {', '.join(dropout)}")

    # Map names and check them against the model before reading any data.
    mapped: dict[str, TensorInfo] = {}
    for hf_name, info in source.tensors.items():
        name = hf_name if source.kind == "af3" else hf_to_af3(hf_name)
        if name in mapped:
            raise ValueError(f"{info.path}: tensors {mapped[name].name!r} and {hf_name!r} both map to {name}")
        mapped[name] = info
    if config.text.tie_word_embeddings and LM_HEAD in mapped:
        _check_tied(mapped.pop(LM_HEAD), mapped.get(EMBED))
        notes.append("lm_head.weight dropped (tie_word_embeddings: it equals embed_tokens)")
    check_layer_counts(config, mapped, f"checkpoint {src}")  # before building that many layers
    expected = expected_shapes(config)
    check_state({k: v.shape for k, v in mapped.items()}, expected, f"checkpoint {src}")
    quantized = {}  # af3 name of a float weight -> the QuantConfig it is stored with
    if qc is not None:
        config.quantization = qc
        quantized = {name: qc for name in _quantized_weights(config)}
        expected = expected_shapes(config)

    lora = None
    if adapter is not None:
        lora = LoraAdapter(adapter, hf_to_af3)
        for name, pair in lora.pairs.items():
            if name not in mapped:
                raise ValueError(f"adapter {adapter}: targets {name}, which the checkpoint does not have")
            want = (pair.b.shape[0], pair.a.shape[1])
            if tuple(mapped[name].shape) != want:
                raise ValueError(f"adapter {adapter}: update for {name} has shape {list(want)} but the "
                                 f"weight is {list(mapped[name].shape)}")
        notes.append(f"LoRA merged into {_plural(len(lora.pairs), 'weight')}")

    cast = DTYPE_CHOICES[dtype]
    # Read in file order, so each source file is read front to back.
    order = sorted(mapped, key=lambda k: (str(mapped[k].path), mapped[k].start))
    plan, float_part = [], []
    for k in order:
        if k in quantized:  # one float weight -> weight, scales[, zeros]
            prefix = k.removesuffix("weight")
            plan += [PlannedTensor(prefix + suffix, dt, shape)
                     for suffix, (dt, shape) in quant.stored_shapes(qc, *mapped[k].shape).items()]
        else:
            plan.append(PlannedTensor(k, _out_dtype(mapped[k].dtype, cast), tuple(mapped[k].shape)))
            float_part.append(plan[-1])
    config.dtype = _config_dtype(float_part)
    shards = plan_shards(plan, max_shard_size)
    files = shard_file_names(len(shards))

    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    made = _make_parents(dst.parent)
    try:
        try:
            tmp.mkdir()
        except OSError as e:
            raise OSError(f"cannot create a directory beside {dst}: {e.strerror or e}") from None
        _write_tensors(tmp, shards, files, mapped, lora, progress, quantized)
        if len(shards) > 1:
            _write_index(tmp, shards, files)
        config.save(tmp / "config.json")
        shutil.copyfile(source.tokenizer, tmp / "tokenizer.json")
        generation.save(tmp / "generation_config.json")
        verify_written(tmp, plan, expected)
        notes += _move_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in made:  # the parents this run created, deepest first, if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise

    total = sum(t.nbytes for t in plan)
    dtypes = "/".join(sorted({str(t.dtype).removeprefix("torch.") for t in plan}))
    if qc is not None:
        notes.append(f"{_plural(len(quantized), 'decoder weight')} quantized to {qc.scheme}"
                     + (f" (group size {qc.group_size})" if qc.group_size else ""))
    return (f"converted {src} ({source.description}) -> {dst}: {len(plan)} tensors, "
            f"{format_size(total)} {dtypes} in {_plural(len(files), 'file')}; " + "; ".join(notes)
            + f"; {time.monotonic() - t0:.1f} s")


def _quantized_weights(config: AF3Config) -> list[str]:
    """Names of the float weights a quantized checkpoint of `config` stores quantized."""
    from af3.model import AudioFlamingo3

    with torch.device("meta"):
        model = AudioFlamingo3(config)
    return quant.replace_linears(model, config.quantization)  # an int4 group size that does not fit fails here


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; returns the directories it created, deepest first."""
    missing = []
    for d in (folder, *folder.parents):
        if d.exists():
            break
        missing.append(d)
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if s == d or s.is_relative_to(d) or d.is_relative_to(s):
        raise ValueError(f"destination {dst} overlaps the source {src}; choose a separate directory")
    if Path.cwd().resolve().is_relative_to(d):
        # '.', '..' or '~' with --force would swap out the directory the user is working in.
        raise ValueError(f"destination {dst} is or contains the current directory; name a separate "
                         "directory for the converted checkpoint")
    if dst.exists() or dst.is_symlink():
        if not force:
            raise ValueError(f"destination {dst} already exists; pass --force to replace it")
        if not dst.is_dir():
            raise ValueError(f"destination {dst} exists and is not a directory; remove it yourself")
        if not dst.is_symlink() and any(dst.iterdir()) and not _is_af3_checkpoint(dst):
            # --force replaces a converted checkpoint; it must never wipe an unrelated folder.
            raise ValueError(f"destination {dst} exists and is not an af3 checkpoint (no config.json with "
                             "\"format\": \"af3\"); --force only replaces af3 checkpoints: remove it "
                             "yourself or choose another directory")
        if not dst.is_symlink():
            foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in dst.iterdir() if not _written_by_us(p))
            if foreign:
                # Notes, an adapter of the user's own, ...: replacing the folder would delete them.
                raise ValueError(f"destination {dst} holds {_plural(len(foreign), 'file')} a conversion does not "
                                 f"write: {', '.join(foreign[:10])}{', …' if len(foreign) > 10 else ''}; --force "
                                 "replaces only af3's own files: move these out of it first, or choose "
                                 "another directory")


def _written_by_us(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and (
        path.name in WRITTEN_FILES or _WRITTEN_SHARD.fullmatch(path.name) is not None)


def remove_dead_partials(dst: Path) -> list[str]:
    """Remove the `.DST.partial-PID` folders of conversions to `dst` whose process is gone (killed
    runs leave them, as large as the model); returns a note saying how much was removed."""
    if not dst.parent.is_dir():
        return []
    removed, freed = 0, 0
    for folder in dst.parent.glob(f".{glob.escape(dst.name)}.partial-*"):
        pid = folder.name.rsplit("-", 1)[1]
        if not pid.isdigit() or not folder.is_dir() or folder.is_symlink() or _process_alive(int(pid)):
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed, freed = removed + 1, freed + size
    if not removed:
        return []
    note = f"removed {_plural(removed, 'partial folder')} of interrupted conversions to {dst} ({format_size(freed)})"
    return [note]


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's process: alive
        return True
    return True


def _is_af3_checkpoint(folder: Path) -> bool:
    try:
        config = read_json_file(folder / "config.json")
    except (OSError, ValueError):
        return False
    return is_af3_config(config)


def _check_tokenizer(path: Path, config: AF3Config) -> None:
    """Build the tokenizer that will be copied, as af3.load will: a bad one fails here, not at load."""
    tok = read_json(path)
    if not isinstance(tok.get("model"), dict):
        # A file with the wrong content, not an argument of the wrong type.
        raise ValueError(f"{path}: not a tokenizers tokenizer.json (no \"model\" object)")  # noqa: TRY004
    sound = hf_files.check_tokenizer(path).added_tokens.get("<sound>")
    if sound != config.audio_token_id:
        raise ValueError(f"{path}: <sound> is token {sound} but the config's audio_token_id "
                         f"is {config.audio_token_id}")


def _check_settings(source: Source) -> None:
    """Every settings file beside the weights: a field af3 would not honour is refused by name."""
    hf_files.check_text_config(source.config["text_config"], f"{source.root / 'config.json'}")
    if source.generation is not None:
        hf_files.check_generation_config(source.generation, "generation_config.json")
    folder = source.tokenizer.parent
    if (folder / "tokenizer_config.json").is_file():
        hf_files.check_tokenizer_config(read_json(folder / "tokenizer_config.json"),
                                        str(folder / "tokenizer_config.json"), hf_layout=source.kind == "hf")
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (source.root / name).is_file():
            hf_files.check_processor_config(read_json(source.root / name), str(source.root / name))
    if source.kind == "hf":
        if (source.root / "chat_template.jinja").is_file():
            path = source.root / "chat_template.jinja"
            hf_files.check_chat_template(path.read_text(encoding="utf-8"), str(path))
        if (source.root / "chat_template.json").is_file():
            path = source.root / "chat_template.json"
            hf_files.check_chat_template(read_json(path).get("chat_template"), str(path))


def _check_tied(lm_head: TensorInfo, embed: TensorInfo | None) -> None:
    """A tied model has no lm_head of its own: the copy in SRC may go only if it is the same tensor."""
    if embed is None:
        return  # reported as missing by check_state
    with open(lm_head.path, "rb") as f:
        head = read_tensor(f, lm_head)
    with open(embed.path, "rb") as f:
        same = head.shape == embed.shape and torch.equal(head, read_tensor(f, embed))
    if not same:
        raise ValueError(f"{lm_head.path}: {lm_head.name} differs from {embed.name} but the config "
                         "ties them (text_config.tie_word_embeddings); transformers would use the "
                         "separate lm_head. Set tie_word_embeddings to false in the source "
                         "config.json to keep it")


def _out_dtype(src: torch.dtype, cast: torch.dtype | None) -> torch.dtype:
    return cast if cast is not None and src.is_floating_point else src


def _config_dtype(plan: list[PlannedTensor]) -> str:
    """The dtype most floating bytes are stored in: what the config records as the checkpoint's."""
    weights = Counter()
    for t in plan:
        if t.dtype.is_floating_point:
            weights[t.dtype] += t.nbytes
    if not weights:
        raise ValueError("checkpoint has no floating-point tensors")
    dtype = str(weights.most_common(1)[0][0]).removeprefix("torch.")
    if dtype not in CONFIG_DTYPES:  # what an af3 config.json may record
        raise ValueError(f"checkpoint is stored in {dtype}; convert with --dtype bf16, fp16 or fp32")
    return dtype


def _write_tensors(tmp: Path, shards: list[list[PlannedTensor]], files: list[str],
                   mapped: dict[str, TensorInfo], lora: LoraAdapter | None,
                   progress: Progress | None, quantized: dict[str, QuantConfig]) -> None:
    n_total = sum(len(s) for s in shards)
    bytes_total = sum(t.nbytes for s in shards for t in s)
    n_done = bytes_done = 0
    handles: dict[Path, object] = {}
    pieces: dict[str, torch.Tensor] = {}  # the quantized parts of one weight, until written
    with contextlib.ExitStack() as stack:
        for shard, file in zip(shards, files):
            writer = ShardWriter(tmp / file, shard)
            for planned in shard:
                if planned.name in pieces:
                    writer.write(planned.name, pieces.pop(planned.name))
                    n_done += 1
                    bytes_done += planned.nbytes
                    if progress is not None:
                        progress(n_done, n_total, bytes_done, bytes_total)
                    continue
                source_name = _source_name(planned.name, mapped, quantized)
                info = mapped[source_name]
                if info.path not in handles:
                    handles[info.path] = stack.enter_context(open(info.path, "rb"))
                tensor = read_tensor(handles[info.path], info)
                delta = lora.delta(source_name) if lora is not None else None
                if delta is not None:
                    # Merge in float32, then round once to the output dtype.
                    tensor = tensor.float() + delta
                    del delta
                if source_name in quantized:
                    prefix = source_name.removesuffix("weight")
                    pieces = {prefix + k: v for k, v in
                              quant.quantize_weight(tensor, quantized[source_name]).items()}
                    tensor = pieces.pop(planned.name)
                else:
                    tensor = tensor.to(planned.dtype)
                writer.write(planned.name, tensor)
                del tensor
                n_done += 1
                bytes_done += planned.nbytes
                if progress is not None:
                    progress(n_done, n_total, bytes_done, bytes_total)
            writer.close()


def _source_name(name: str, mapped: dict[str, TensorInfo], quantized: dict[str, QuantConfig]) -> str:
    """The SRC tensor a planned output tensor is made from (its float weight, for quantized parts)."""
    if name in mapped:
        return name
    for suffix in ("scales", "zeros"):
        if name.endswith("." + suffix) and name.removesuffix(suffix) + "weight" in quantized:
            return name.removesuffix(suffix) + "weight"
    raise ValueError(f"no source tensor for planned output {name}")


def _write_index(tmp: Path, shards: list[list[PlannedTensor]], files: list[str]) -> None:
    index = {
        "metadata": {"total_size": sum(t.nbytes for s in shards for t in s)},
        "weight_map": {t.name: file for shard, file in zip(shards, files) for t in shard},
    }
    with open(tmp / INDEX_NAME, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def _generation_config(source: Source) -> tuple[GenerationConfig, str]:
    if source.generation is None:
        return GenerationConfig(), "no generation_config.json in the source: af3's defaults written"
    if source.kind == "af3":
        return GenerationConfig.load(source.root / "generation_config.json"), "generation_config.json copied"
    return GenerationConfig.from_hf(source.generation), "generation_config.json converted"


def verify_written(folder: Path, plan: list[PlannedTensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Re-read every header written under `folder` (with safetensors' own parser) against the plan."""
    from safetensors import safe_open

    want = {t.name: t for t in plan}
    found: dict[str, tuple[int, ...]] = {}
    for file, listed in weight_files(folder).items():
        with safe_open(str(file), framework="pt") as f:
            check_shard(file, f.keys(), listed)
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = f.get_slice(name)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                t = want.get(name)
                if t is None or shape != t.shape or dtype != DTYPE_NAMES[t.dtype]:
                    raise ValueError(f"{file}: wrote {name} {dtype} {list(shape)}, which "
                                     "is not what was planned")
                found[name] = shape
    check_state(found, expected, f"converted checkpoint {folder}")


def _move_into_place(tmp: Path, dst: Path) -> list[str]:
    """Rename `tmp` to `dst`; an existing `dst` is replaced only once the new one is in place.

    Returns notes for the summary (a replaced DST whose old copy could not be removed).
    """
    if not (dst.exists() or dst.is_symlink()):
        os.rename(tmp, dst)
        return []
    # Swap: the old DST is set aside (not deleted) until the new one is in place, and put back
    # if that fails.
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    try:
        if old.is_symlink():
            old.unlink()  # DST was a link: the link goes, not the directory it pointed to
        else:
            shutil.rmtree(old)
    except (OSError, KeyboardInterrupt) as e:
        # The conversion is complete and in place; only the old copy's removal failed.
        note = f"the replaced {dst} could not be fully removed; delete {old} yourself ({type(e).__name__}: {e})"
        return [note]
    return []


