"""Safetensors files read and written one tensor at a time, so that memory holds one tensor.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the raw little-endian tensor bytes, offsets relative to the end of the header.

Reading goes through plain `readinto` rather than a memory map: pages of a mapped file stay in
the process's resident set while the map is open, so streaming a 16 GB file through a map would
look like holding it all. Writing plans every shard's header first (names, dtypes and shapes are
known before any data is read), then streams the bytes.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from af3.checkpoint import WEIGHTS_NAME
from af3.config import is_int
from af3.jsonfile import parse_json

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000  # safetensors itself refuses longer headers (its MAX_HEADER_SIZE)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in that file."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte
    nbytes: int


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; returns name -> TensorInfo in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file (header length {n} does not fit a "
                             f"{size}-byte file)")
        header = parse_json(f.read(n), f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")  # noqa: TRY004 (file content)
    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if "\0" in name:
            raise ValueError(f"{path}: safetensors header: tensor name {name!r} holds a NUL character")
        out[name] = _entry(path, name, entry, data_start, size)
    ordered = dict(sorted(out.items(), key=lambda kv: (kv[1].start, kv[1].nbytes)))
    _check_contiguous(path, list(ordered.values()), data_start, size)
    return ordered


def _check_contiguous(path: Path, infos: list[TensorInfo], data_start: int, size: int) -> None:
    """Tensors tile the data area exactly, as the safetensors library requires: no byte is shared by
    two tensors (a crafted file could otherwise make one stored block count as many tensors) and
    no byte is unaccounted for."""
    end = data_start
    for info in infos:
        if info.start != end:
            what = "overlaps the tensor before it" if info.start < end else "leaves a gap after the tensor before it"
            raise ValueError(f"{path}: tensor {info.name!r}: data_offsets start at {info.start - data_start}, "
                             f"which {what} (ending at {end - data_start}); not a valid safetensors file")
        end += info.nbytes
    if end != size:
        raise ValueError(f"{path}: the tensors end at byte {end} of a {size}-byte file; not a valid "
                         "safetensors file (extra data at the end)")


def _entry(path: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: header entry is not an object")  # noqa: TRY004 (file content)
    dtype = DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise ValueError(f"{where}: dtype {entry.get('dtype')!r} is not supported "
                         f"(one of {sorted(DTYPES)})")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)):
        raise ValueError(f"{where}: bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(is_int(o) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{where}: bad data_offsets {offsets!r}")
    nbytes = offsets[1] - offsets[0]
    numel = 1
    for d in shape:
        numel *= d
    if nbytes != numel * dtype.itemsize:
        raise ValueError(f"{where}: {nbytes} bytes stored for shape {shape} of {entry['dtype']}")
    if data_start + offsets[1] > size:
        raise ValueError(f"{where}: data runs past the end of the file (truncated download?)")
    return TensorInfo(path, name, dtype, tuple(shape), data_start + offsets[0], nbytes)


def read_tensor(f, info: TensorInfo) -> torch.Tensor:
    """Read one tensor from `f` (the open file of `info.path`) into fresh memory."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    f.seek(info.start)
    got = f.readinto(memoryview(buf.numpy()))
    if got != info.nbytes:
        raise ValueError(f"{info.path}: tensor {info.name!r} is truncated ({got} of {info.nbytes} bytes)")
    return buf.view(info.dtype).reshape(info.shape)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    used = 0
    for t in tensors:
        if shards[-1] and used + t.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += t.nbytes
    return shards


def shard_file_names(n_shards: int) -> list[str]:
    if n_shards == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]


class ShardWriter:
    """Writes one shard: the full header first, then each tensor's bytes in planned order."""

    def __init__(self, path: Path, tensors: list[PlannedTensor]):
        self.path = path
        self._todo = list(tensors)
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in tensors:
            header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to a multiple of 8
        self._f = open(path, "wb")  # noqa: SIM115 (closed by close(); one shard spans many calls)
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if not self._todo:
            raise ValueError(f"{self.path}: tensor {name!r} was not planned for this shard")
        want = self._todo[0]
        if (name, tensor.dtype, tuple(tensor.shape)) != (want.name, want.dtype, want.shape):
            raise ValueError(f"{self.path}: expected {want.name} {want.dtype} {list(want.shape)}, "
                             f"got {name} {tensor.dtype} {list(tensor.shape)}")
        self._todo.pop(0)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._f.write(memoryview(data.numpy()))

    def close(self) -> None:
        if self._todo:
            raise ValueError(f"{self.path}: {len(self._todo)} planned tensors were never written, "
                             f"first {self._todo[0].name!r}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
