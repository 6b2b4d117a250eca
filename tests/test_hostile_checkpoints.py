"""Hostile checkpoints: crafted sizes in config.json / generation_config.json, layer counts no file
backs, malformed safetensors headers, deeply nested JSON. Each is refused before it allocates,
with a ValueError naming the file and the setting."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open

import af3
import af3.model
from tests.tiny_checkpoint import write_tiny_hf_checkpoint
from weights_convert.convert import convert
from weights_convert.safetensors_io import read_header


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    hf = write_tiny_hf_checkpoint(root / "hf")
    hf_sharded = write_tiny_hf_checkpoint(root / "hf-sharded", shards=2)
    convert(hf, root / "af3")
    convert(hf, root / "af3-sharded", max_shard_size=50_000)
    return {"root": root, "hf": hf, "hf-sharded": hf_sharded, "af3": root / "af3", "af3-sharded": root / "af3-sharded"}


def copy_of(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


# ---- crafted sizes ---------------------------------------------------------------------------


def test_a_kv_cache_no_machine_holds_is_refused_by_name(tiny, tmp_path) -> None:
    ckpt = copy_of(tiny["af3"], tmp_path / "ckpt")
    edit_json(ckpt / "config.json", lambda d: d["text"].update(max_position_embeddings=2 * 10**13))
    edit_json(ckpt / "generation_config.json", lambda d: d.update(max_new_tokens=10**13))
    bundle = af3.load(ckpt)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"the KV cache for 1 x 10,000,000,000,003 positions \(prompt 3 \+ "
                                         r"max_new_tokens 10,000,000,000,000\) would take .* bytes\), more than the "
                                         r".* of memory on cpu; lower max_new_tokens"):
        bundle.model.generate(input_ids=ids)
    with pytest.raises(ValueError, match=r"a KV cache of 2 x 10,000,000,000,000 positions \(max_len\) would take "
                                         r"[\d,.]+ TB|a KV cache of 2 x 10,000,000,000,000 positions \(max_len\) would take"):
        bundle.model.new_cache(2, 10**13)
    assert bundle.model.new_cache(1, 64).max_len == 64  # ordinary sizes are untouched


@pytest.mark.parametrize(("setting", "value", "match"), [
    ("n_fft", 10**9, r"config\.frontend: n_fft is 1000000000, but af3's frontend is Whisper's, fixed at 400"),
    ("hop_length", 1, r"config\.frontend: hop_length is 1, .* fixed at 160"),
    ("sampling_rate", 10**9, r"config\.frontend: sampling_rate is 1000000000, .* fixed at 16000"),
    ("num_mel_bins", 10**7, r"audio: num_mel_bins 10,000,000 \(the mel filter bank\) would take 16,080,000,000 bytes"),
])
def test_frontend_sizes_no_frontend_has_are_refused_by_name(tiny, tmp_path, setting, value, match) -> None:
    """The frontend's sizes are constants now (af3.frontend); a format_version 1 config still
    carried them and is read, but only with Whisper's values. Mel bins stay the encoder's."""
    ckpt = copy_of(tiny["af3"], tmp_path / "ckpt")

    def edit(d):
        d["format_version"] = 1
        d["frontend"] = {"sampling_rate": 16000, "n_fft": 400, "hop_length": 160,
                         "num_mel_bins": d["audio"]["num_mel_bins"], "chunk_length": 30, "max_windows": 20}
        if setting == "num_mel_bins":
            d["audio"][setting] = value
        d["frontend"][setting] = value

    edit_json(ckpt / "config.json", edit)
    with pytest.raises(ValueError, match=rf"config\.json: {match}"):
        af3.load(ckpt)


def test_converter_refuses_a_crafted_n_fft(tiny, tmp_path) -> None:
    src = copy_of(tiny["hf"], tmp_path / "src")
    edit_json(src / "processor_config.json", lambda d: d["feature_extractor"].update(n_fft=10**9))
    with pytest.raises(ValueError, match=r"feature extractor: n_fft is 1000000000; af3's frontend is Whisper's"):
        convert(src, tmp_path / "out")


# ---- layer counts ----------------------------------------------------------------------------


@pytest.fixture
def never_built(monkeypatch):
    def refuse(self, config):
        raise AssertionError(f"AudioFlamingo3 was built with {config.text.num_hidden_layers} decoder layers")
    monkeypatch.setattr(af3.model.AudioFlamingo3, "__init__", refuse)


@pytest.mark.parametrize(("tower", "n"), [("text", 10**9), ("audio", 10**5), ("text", 3)])
def test_load_compares_layer_counts_with_the_tensor_names_first(tiny, tmp_path, never_built, tower, n) -> None:
    ckpt = copy_of(tiny["af3"], tmp_path / "ckpt")
    edit_json(ckpt / "config.json", lambda d: d[tower].update(num_hidden_layers=n))
    where = "decoder" if tower == "text" else "encoder"
    with pytest.raises(ValueError, match=rf"checkpoint .*ckpt: the config's {tower} num_hidden_layers is {n:,} but "
                                         rf"the weights hold {where} layers 0\.\.1; the config does not belong"):
        af3.load(ckpt)


@pytest.mark.parametrize(("part", "n"), [("text_config", 10**9), ("audio_config", 10**5)])
def test_convert_compares_layer_counts_with_the_tensor_names_first(tiny, tmp_path, never_built, part, n) -> None:
    src = copy_of(tiny["hf"], tmp_path / "src")
    key = "num_hidden_layers" if part == "text_config" else "encoder_layers"
    edit_json(src / "config.json", lambda d: d[part].update({key: n}))
    if part == "audio_config":
        edit_json(src / "config.json", lambda d: d[part].update(num_hidden_layers=n))
    with pytest.raises(ValueError, match=rf"num_hidden_layers is {n:,} but the weights hold (en|de)coder layers 0\.\.1"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- safetensors headers ---------------------------------------------------------------------


def write_raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}


@pytest.mark.parametrize(("tensors", "size", "match"), [
    ({"a": (0, 16), "b": (0, 16)}, 16, r"tensor 'b': data_offsets start at 0, which overlaps the tensor before it"),
    ({"a": (0, 16), "b": (8, 24)}, 24, r"tensor 'b': data_offsets start at 8, which overlaps"),
    ({"a": (0, 8), "b": (16, 24)}, 24, r"tensor 'b': data_offsets start at 16, which leaves a gap"),
    ({"a": (0, 8)}, 16, r"the tensors end at byte .* of a .*-byte file; not a valid safetensors file"),
    ({"a": (8, 16)}, 16, r"tensor 'a': data_offsets start at 8, which leaves a gap"),
])
def test_overlaps_and_gaps_are_refused_as_safetensors_does(tmp_path, tensors, size, match) -> None:
    path = write_raw_safetensors(tmp_path / "x.safetensors", {k: _entry(*v) for k, v in tensors.items()},
                                 bytes(size))
    with pytest.raises(SafetensorError):  # the reference refuses each of these
        safe_open(str(path), framework="pt")
    with pytest.raises(ValueError, match=rf"x\.safetensors: {match}"):
        read_header(path)


@pytest.mark.parametrize(("entry", "match"), [
    ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, r"bad shape \[True\]"),  # was read as [1]
    ({"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}, r"bad data_offsets \[False, 4\]"),
])
def test_a_bool_in_a_header_is_not_a_number(tmp_path, entry, match) -> None:
    path = write_raw_safetensors(tmp_path / "x.safetensors", {"a": entry}, bytes(4))
    with pytest.raises(ValueError, match=match):
        read_header(path)


def test_a_shared_block_cannot_grow_a_conversion(tiny, tmp_path) -> None:
    # Every tensor of the source pointed at the same bytes: the converter wrote each one out in full.
    src = copy_of(tiny["hf"], tmp_path / "src")
    header = read_header(src / "model.safetensors")
    first, second = list(header)[:2]
    raw = (src / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    d = json.loads(raw[8:8 + n])
    d[second]["data_offsets"] = d[first]["data_offsets"]
    d[second]["shape"], d[second]["dtype"] = d[first]["shape"], d[first]["dtype"]
    write_raw_safetensors(src / "model.safetensors", d, raw[8 + n:])
    with pytest.raises(ValueError, match="overlaps the tensor before it"):
        convert(src, tmp_path / "out")


def test_a_5000_digit_integer_names_the_file_and_field(tmp_path) -> None:
    path = tmp_path / "x.safetensors"
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"9" * 5000 + b"]}}"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(ValueError, match=r"x\.safetensors: safetensors header: not valid JSON \(an integer of 5000 "
                                         r"digits, in 'data_offsets'\)"):
        read_header(path)


def test_nul_in_names_names_the_file_and_field(tiny, tmp_path) -> None:
    path = write_raw_safetensors(tmp_path / "x.safetensors", {"a\0b": _entry(0, 4)}, bytes(4))
    with pytest.raises(ValueError, match=r"x\.safetensors: safetensors header: tensor name 'a\\x00b' holds a NUL"):
        read_header(path)
    # A shard name in an index, for af3.load and for the converter.
    ckpt = copy_of(tiny["af3-sharded"], tmp_path / "ckpt")
    edit_json(ckpt / "model.safetensors.index.json",
              lambda d: d["weight_map"].update({next(iter(d["weight_map"])): "model\0.safetensors"}))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: weight_map: shard name "
                                         r"'model\\x00\.safetensors' holds a NUL character"):
        af3.load(ckpt)
    src = copy_of(tiny["hf-sharded"], tmp_path / "src")
    edit_json(src / "model.safetensors.index.json",
              lambda d: d["weight_map"].update({next(iter(d["weight_map"])): "model\0.safetensors"}))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: weight_map: shard name "
                                         r"'model\\x00\.safetensors' holds a NUL character"):
        convert(src, tmp_path / "out")


# ---- deeply nested JSON, in every file read --------------------------------------------------

NESTED = "[" * 100_000


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer.json",
                                  "model.safetensors.index.json"])
def test_nested_json_in_a_checkpoint_is_invalid_json_naming_the_file(tiny, tmp_path, name) -> None:
    ckpt = copy_of(tiny["af3-sharded"], tmp_path / "ckpt")
    (ckpt / name).write_text(NESTED)
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}: not valid JSON \(nested too deeply\)"):
        af3.load(ckpt)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer.json",
                                  "processor_config.json", "tokenizer_config.json", "model.safetensors.index.json",
                                  "adapter_config.json",
                                  "header"])
def test_nested_json_in_a_source_is_invalid_json_naming_the_file(tiny, tmp_path, name) -> None:
    src = copy_of(tiny["hf-sharded"], tmp_path / "src")
    adapter = None
    if name == "adapter_config.json":
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / name).write_text(NESTED)
    elif name == "header":
        shard = min(src.glob("model-*.safetensors"))
        raw = NESTED.encode()
        shard.write_bytes(struct.pack("<Q", len(raw)) + raw)
        name = shard.name
    else:
        (src / name).write_text(NESTED)
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}.*: not valid JSON \(nested too deeply\)"):
        convert(src, tmp_path / "out", adapter=adapter)


# ---- --force and interrupted conversions -----------------------------------------------------


def test_force_refuses_to_delete_files_af3_did_not_write(tiny, tmp_path, capsys) -> None:
    from weights_convert.__main__ import main

    dst = tmp_path / "out"
    convert(tiny["hf"], dst)
    (dst / "notes.md").write_text("my notes")
    (dst / "adapter.safetensors").write_bytes(b"mine")
    (dst / "runs").mkdir()
    assert main([str(tiny["hf"]), str(dst), "--force", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert ("weights_convert: error: destination " + str(dst) + " holds 3 files a conversion does not write: "
            "adapter.safetensors, notes.md, runs/; --force replaces only af3's own files") in err
    assert (dst / "notes.md").read_text() == "my notes" and (dst / "adapter.safetensors").read_bytes() == b"mine"
    for p in ("notes.md", "adapter.safetensors"):
        (dst / p).unlink()
    (dst / "runs").rmdir()
    assert main([str(tiny["hf"]), str(dst), "--force", "--quiet"]) == 0  # af3's own files alone: replaced


def test_partial_folders_of_dead_runs_are_removed_and_reported(tiny, tmp_path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    dst = tmp_path / "out"
    left = tmp_path / f".out.partial-{dead_pid}"
    left.mkdir()
    (left / "model.safetensors").write_bytes(bytes(3_000_000))
    alive = tmp_path / f".out.partial-{1}"  # pid 1 is always running: a conversion in progress
    alive.mkdir()
    other = tmp_path / f".elsewhere.partial-{dead_pid}"  # not a conversion to this destination
    other.mkdir()
    summary = convert(tiny["hf"], dst)
    assert "removed 1 partial folder of interrupted conversions to " + str(dst) + " (3.0 MB)" in summary
    assert not left.exists() and alive.is_dir() and other.is_dir()


def test_nested_json_in_a_manifest_or_trainer_state_names_the_file(tiny, tmp_path) -> None:
    from af3.finetune import STATE_FILE, latest_checkpoint, read_manifest

    manifest = tmp_path / "train.jsonl"
    manifest.write_text(NESTED + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl:1: not valid JSON \(nested too deeply\)"):
        read_manifest(manifest, af3.load(tiny["af3"]).processor)
    (tmp_path / "run" / "checkpoint-000010").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-000010" / STATE_FILE).write_text(NESTED)
    with pytest.raises(ValueError, match=rf"checkpoint-000010/{STATE_FILE}: not valid JSON \(nested too deeply\)"):
        latest_checkpoint(tmp_path / "run")


def test_nested_or_huge_json_in_corpus_files_names_the_file_and_line(tmp_path) -> None:
    """Corpus manifests and results are read a line at a time: a line nested past the recursion
    limit, or holding a 5000-digit integer, is a ValueError naming the file and line (not a
    RecursionError); in a part file a killed rank left, such a line is skipped like a half line."""
    from af3.corpus import Item, part_path, read_manifest, read_records

    manifest = tmp_path / "m.jsonl"
    for line, reason in (('{"audio": ' + NESTED, r"nested too deeply"), ('{"audio": "a.wav", "id": ' + "9" * 5000 + "}",
                                                         r"an integer of 5000 digits, in 'id'")):
        manifest.write_text('a.wav\n' + line + "\n")
        with pytest.raises(ValueError, match=rf"m\.jsonl, line 2: not valid JSON \({reason}\)"):
            read_manifest(manifest)
    items = [Item(0, "a.wav"), Item(1, "b.wav")]
    out = tmp_path / "out.jsonl"
    good = json.dumps({"index": 1, "id": "b.wav", "audio": "b.wav", "text": "hi"})
    part_path(out, 1).write_text(NESTED + "\n" + good + "\n")
    assert read_records(out, items) == {1: json.loads(good)}
    out.write_text(NESTED + "\n")
    with pytest.raises(ValueError, match=r"out\.jsonl, line 1: not a JSON record"):
        read_records(out, items)


def test_a_5000_digit_integer_in_a_finetuning_manifest_names_the_line(tiny, tmp_path) -> None:
    from af3.finetune import read_manifest

    manifest = tmp_path / "train.jsonl"
    manifest.write_text('{"messages": [], "x": ' + "9" * 5000 + "}\n")
    with pytest.raises(ValueError, match=r"train\.jsonl:1: not valid JSON \(an integer of 5000 digits, in 'x'\)"):
        read_manifest(manifest, af3.load(tiny["af3"]).processor)


def test_a_manifest_that_is_not_utf8_names_the_line(tiny, tmp_path) -> None:
    from af3.corpus import read_manifest as corpus_manifest
    from af3.finetune import read_manifest as finetune_manifest

    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'a.wav\n{"audio": "b\xff.wav"}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl, line 2: not UTF-8 text \(byte 0xff\)"):
        corpus_manifest(manifest)
    with pytest.raises(ValueError, match=r"m\.jsonl, line 2: not UTF-8 text \(byte 0xff\)"):
        finetune_manifest(manifest, af3.load(tiny["af3"]).processor)
