"""Find out which checkpoint layout a directory holds, and list its tensors and settings.

Two layouts are read (README.md, "The real model"):

- "hf": what transformers writes for `nvidia/audio-flamingo-3-hf`: `config.json` with
  `audio_config` and `text_config`, `model.safetensors` or an index + shards, `tokenizer.json`,
  `generation_config.json`, and the frontend in `preprocessor_config.json` (or nested in
  `processor_config.json`).
- "nvidia": NVIDIA's original `nvidia/audio-flamingo-3`: `llm/` (a Qwen2 checkpoint),
  `sound_tower/` (the encoder without the `audio_tower.` prefix) and `sound_mm_projector/`
  (`layers.0.*` / `layers.2.*`). Its tensor names are rewritten to the HF ones here, so that
  one name map (names.py) serves both.

An af3 checkpoint is read too (kind "af3": names and config already ours), so that a float one
can be re-cast or quantized (`--quantize`) without the original at hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from af3.checkpoint import check_shard, weight_files
from af3.config import is_af3_config, is_int
from af3.jsonfile import read_json_file
from weights_convert.safetensors_io import TensorInfo, read_header

NVIDIA_PARTS = ("llm", "sound_tower", "sound_mm_projector")


@dataclass
class Source:
    """A checkpoint to convert: its tensors under HF names and where its settings come from."""

    root: Path
    kind: str  # "hf", "nvidia" or "af3"
    config: dict  # an HF-style config dict with audio_config and text_config (af3: our own config)
    preprocessor: dict | None  # feature-extractor settings, None when the source has none
    generation: dict | None  # generation_config.json, None when absent
    tokenizer: Path
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # HF (af3: af3) name -> where it is
    n_files: int = 0

    @property
    def description(self) -> str:
        files = "1 file" if self.n_files == 1 else f"{self.n_files} files"
        return f"{self.kind} layout, {files}"


def read_json(path: Path) -> dict:
    d = read_json_file(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")  # noqa: TRY004 (file content)
    return d


def detect_layout(root: str | Path) -> str:
    """'af3', 'hf' or 'nvidia'; ValueError saying what was looked for when it is none of these."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {root}")
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory (expected a checkpoint directory)")
    if all((root / p).is_dir() for p in NVIDIA_PARTS):
        return "nvidia"
    config = root / "config.json"
    if config.is_file():
        d = read_json(config)
        if is_af3_config(d):
            return "af3"
        if "audio_config" in d and "text_config" in d:
            return "hf"
        raise ValueError(f"{config} is neither an HF AudioFlamingo3 config (no audio_config / "
                         f"text_config) nor an af3 config (no \"format\": \"af3\")")
    raise ValueError(f"{root}: no config.json and no {'/, '.join(NVIDIA_PARTS)}/ folders; "
                     "not an AF3 checkpoint in a layout this tool knows")


def open_source(root: str | Path) -> Source:
    """Read the layout, config and tensor headers of SRC (no tensor data is read)."""
    root = Path(root)
    kind = detect_layout(root)
    if kind == "af3":
        tensors, n_files = _read_tensors(root)
        return Source(root, "af3", read_json(root / "config.json"), None,
                      _optional_json(root / "generation_config.json"), root / "tokenizer.json",
                      tensors, n_files)
    if kind == "hf":
        return _open_hf(root)
    return _open_nvidia(root)


def _open_hf(root: Path) -> Source:
    config = read_json(root / "config.json")
    preprocessor = None
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (root / name).is_file():
            preprocessor = read_json(root / name)
            break
    tensors, n_files = _read_tensors(root)
    return Source(root, "hf", config, preprocessor, _optional_json(root / "generation_config.json"),
                  root / "tokenizer.json", tensors, n_files)


def _open_nvidia(root: Path) -> Source:
    llm, tower, _projector = (root / p for p in NVIDIA_PARTS)
    tokenizer = llm / "tokenizer.json" if (llm / "tokenizer.json").is_file() else root / "tokenizer.json"
    config = {
        "audio_config": read_json(tower / "config.json"),
        "text_config": read_json(llm / "config.json"),
        # The original checkpoint keeps the <sound> id only in its tokenizer.
        "audio_token_id": _added_token_id(tokenizer, "<sound>"),
    }
    preprocessor = None
    for p in (root / "preprocessor_config.json", tower / "preprocessor_config.json"):
        if p.is_file():
            preprocessor = read_json(p)
            break
    generation = _optional_json(root / "generation_config.json") or _optional_json(
        llm / "generation_config.json")

    tensors: dict[str, TensorInfo] = {}
    n_files = 0
    for part in NVIDIA_PARTS:
        part_tensors, n = _read_tensors(root / part)
        n_files += n
        for name, info in part_tensors.items():
            tensors[_nvidia_to_hf(part, name, info)] = info
    return Source(root, "nvidia", config, preprocessor, generation, tokenizer, tensors, n_files)


def _nvidia_to_hf(part: str, name: str, info: TensorInfo) -> str:
    if part == "llm":  # a Qwen2ForCausalLM: model.* and lm_head.weight
        return f"language_model.{name}"
    if part == "sound_tower":
        return name if name.startswith("audio_tower.") else f"audio_tower.{name}"
    # The projector is an nn.Sequential(Linear, GELU, Linear): indices 0 and 2.
    for index, linear in (("layers.0.", "linear_1."), ("layers.2.", "linear_2.")):
        if name.startswith(index):
            return f"multi_modal_projector.{linear}{name[len(index):]}"
    raise ValueError(f"{info.path}: tensor {name!r} is not one of the projector's layers.0.* / "
                     "layers.2.* tensors")


def _read_tensors(folder: Path) -> tuple[dict[str, TensorInfo], int]:
    """All tensors of the checkpoint in `folder` (single file or index + shards) and its file count."""
    files = weight_files(folder)
    tensors: dict[str, TensorInfo] = {}
    for path, listed in files.items():
        header = read_header(path)
        check_shard(path, header, listed)
        tensors.update(header)
    return tensors, len(files)


def _optional_json(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def _added_token_id(tokenizer: Path, content: str) -> int:
    for token in read_json(tokenizer).get("added_tokens") or []:
        if isinstance(token, dict) and token.get("content") == content:
            if not is_int(token.get("id")):
                raise ValueError(f"{tokenizer}: added token {content!r} has no integer id "
                                 f"(got {token.get('id')!r})")
            return token["id"]
    raise ValueError(f"{tokenizer}: no added token {content!r}; cannot tell the audio token id")
