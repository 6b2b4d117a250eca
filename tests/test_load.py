"""af3.load: the bundle it returns, dtype/device handling, and every refusal (by name)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import af3
from af3.generation import GenerationConfig
from tests.devices import CUDA
from tests.tiny_checkpoint import write_tiny_hf_checkpoint, write_tiny_nvidia_checkpoint
from weights_convert.convert import convert


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("load")
    hf = write_tiny_hf_checkpoint(root / "hf")
    convert(hf, root / "af3")
    convert(hf, root / "af3-sharded", max_shard_size=50_000)
    return {"root": root, "hf": hf, "af3": root / "af3", "sharded": root / "af3-sharded"}


def copy_of(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_bundle_parts(tiny):
    bundle = af3.load(tiny["af3"])
    assert not bundle.model.training
    assert bundle.config.text.hidden_size == 48 and bundle.config.dtype == "float32"
    assert isinstance(bundle.generation_config, GenerationConfig)
    assert bundle.generation_config.top_k == 20 and bundle.model.generation_config is bundle.generation_config
    assert bundle.tokenizer.convert_ids_to_tokens(bundle.config.audio_token_id) == "<sound>"
    assert bundle.processor.tokenizer is bundle.tokenizer
    assert bundle.processor.audio_token_id == bundle.config.audio_token_id
    ref = load_file(str(tiny["hf"] / "model.safetensors"))
    assert torch.equal(bundle.model.state_dict()["decoder.layers.1.mlp.down.weight"],
                       ref["language_model.model.layers.1.mlp.down_proj.weight"])
    assert all(not t.is_meta for t in bundle.model.state_dict().values())
    assert all(not b.is_meta for b in bundle.model.buffers())


def test_sharded_equals_single(tiny):
    one = af3.load(tiny["af3"]).model.state_dict()
    many = af3.load(tiny["sharded"]).model.state_dict()
    assert len(list(tiny["sharded"].glob("model-*.safetensors"))) > 1
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16", "bf16"])
def test_dtype_cast_on_load(tiny, dtype):
    model = af3.load(tiny["af3"], dtype=dtype).model
    want = {torch.bfloat16: torch.bfloat16, "float16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert {p.dtype for p in model.parameters()} == {want}


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), CUDA], ids=["cpu", "torch.device", "cuda"])
def test_device_argument(tiny, device):
    model = af3.load(tiny["af3"], device=device).model
    assert {p.device.type for p in model.parameters()} == {torch.device(device).type}


def test_hf_and_nvidia_layouts_get_the_convert_command(tiny):
    with pytest.raises(ValueError, match=r"python -m weights_convert .*hf .*hf-af3") as e:
        af3.load(tiny["hf"])
    assert "Hugging Face" in str(e.value)
    nvidia = write_tiny_nvidia_checkpoint(tiny["root"] / "nvidia", tiny["hf"])
    with pytest.raises(ValueError, match=r"NVIDIA.*\n +python -m weights_convert .*nvidia .*nvidia-af3"):
        af3.load(nvidia)


def test_missing_unexpected_and_misshaped_are_named(tiny, tmp_path):
    d = copy_of(tiny["af3"], tmp_path / "bad")
    state = load_file(str(d / "model.safetensors"))
    del state["encoder.layers.0.fc1.bias"]
    state["decoder.extra.weight"] = torch.zeros(3)
    state["projector.linear1.weight"] = torch.zeros(5, 5)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="1 missing: encoder.layers.0.fc1.bias") as e:
        af3.load(d)
    msg = str(e.value)
    assert "1 missing: encoder.layers.0.fc1.bias" in msg
    assert "1 unexpected: decoder.extra.weight" in msg
    assert "projector.linear1.weight [5, 5] (config wants [48, 32])" in msg


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        af3.load(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="path must be"):
        af3.load(42)
    with pytest.raises(ValueError, match="not one of"):
        af3.load(tiny["af3"], dtype="int8")
    with pytest.raises(ValueError, match="floating-point"):
        af3.load(tiny["af3"], dtype=torch.int32)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        af3.load(tmp_path / "file")
    d = copy_of(tiny["af3"], tmp_path / "no-weights")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        af3.load(d)
    d = copy_of(tiny["sharded"], tmp_path / "escaping-index")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not a file inside"):
        af3.load(d)
    d = copy_of(tiny["af3"], tmp_path / "old-format")
    cfg = json.loads((d / "config.json").read_text())
    cfg["format_version"] = 999
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version"):
        af3.load(d)


def test_device_refusals_name_the_device(tiny):
    with pytest.raises(TypeError, match=r"device must be a str or torch.device.*'cuda:3'"):
        af3.load(tiny["af3"], device=3)  # torch would read 3 as cuda:3
    with pytest.raises(TypeError, match="device must be"):
        af3.load(tiny["af3"], device=None)
    with pytest.raises(ValueError, match="'gpu' is not a device name"):
        af3.load(tiny["af3"], device="gpu")  # was torch's RuntimeError
    with pytest.raises(ValueError, match="'meta' holds no data"):
        af3.load(tiny["af3"], device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            af3.load(tiny["af3"], device="cuda")  # was torch's RuntimeError about the driver
    else:
        n = torch.cuda.device_count()
        with pytest.raises(ValueError, match=f"has {n} CUDA device"):
            af3.load(tiny["af3"], device=f"cuda:{n}")
    with pytest.raises(ValueError, match="floating-point"):
        af3.load(tiny["af3"], dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="dtype 'int8'"):
        af3.load(tmp := tiny["root"] / "nowhere", dtype="int8")  # arguments first, then files
    assert not tmp.exists()


def test_damaged_files_are_value_errors_naming_the_file(tiny, tmp_path):
    d = copy_of(tiny["af3"], tmp_path / "truncated")
    data = (d / "model.safetensors").read_bytes()
    for cut in (data[:-1000], data[:5], b""):
        (d / "model.safetensors").write_bytes(cut)
        with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file"):
            af3.load(d)  # was safetensors' own SafetensorError
    d = copy_of(tiny["sharded"], tmp_path / "index-list")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    with pytest.raises(ValueError, match="weight_map is a list"):
        af3.load(d)  # was an AttributeError
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": None}}))
    with pytest.raises(ValueError, match="shard None is not a file inside"):
        af3.load(d)
    d = copy_of(tiny["af3"], tmp_path / "int-tensor")
    state = load_file(str(d / "model.safetensors"))
    state["encoder.conv1.bias"] = state["encoder.conv1.bias"].to(torch.int32)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"not floating-point: encoder\.conv1\.bias \(I32\)"):
        af3.load(d)  # was a RuntimeError from load_state_dict
    d = copy_of(tiny["af3"], tmp_path / "bad-config")
    for text, match in (("[1]", "expected a JSON object"),  # was a TypeError
                        ('{"format": "af3", "format_version": 1}', "config: required key 'audio'")):
        (d / "config.json").write_text(text)
        with pytest.raises(ValueError, match=f"config.json: {match}"):
            af3.load(d)


@pytest.mark.parametrize("layout", ["af3", "hf"])
def test_one_index_reader_for_load_and_convert(tiny, tmp_path, layout):
    """af3.checkpoint.weight_files reads the index for af3.load and for weights_convert alike:
    each bad index or shard set below is refused, naming the file, by both."""
    sharded = tiny["sharded"] if layout == "af3" else write_tiny_hf_checkpoint(tmp_path / "hf", shards=2)
    readers = [lambda d: convert(d, tmp_path / f"out-{d.name}")]
    if layout == "af3":
        readers.append(af3.load)

    def edited(name: str, edit) -> Path:
        d = copy_of(sharded, tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}")
        path = d / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        edit(d, index)
        if path.exists():
            path.write_text(json.dumps(index))
        return d

    def moved(d, index):  # a tensor of the first shard, listed for the second
        first, second = sorted(set(index["weight_map"].values()))[:2]
        name = next(k for k, v in index["weight_map"].items() if v == first)
        index["weight_map"][name] = second

    def only_pickle(d, index):
        for p in d.glob("model*.safetensors*"):  # the index too: edited() then writes none
            p.unlink()
        (d / "pytorch_model.bin").write_bytes(b"not read")

    extra = (r"model\.safetensors\.index\.json lists 1 tensors for model-00001-of-\d+\.safetensors that it does "
             r"not hold, first 'extra\.weight'")
    cases = [
        (lambda d, index: index["weight_map"].update({"extra.weight": min(index["weight_map"].values())}), extra),
        (moved, r"model-00001-of-\d+\.safetensors: tensor '.*' is not listed for this file"),
        (lambda d, index: index.update(weight_map={}), "weight_map is empty: it lists no tensors"),
        (only_pickle, r"holds only pickle weights \(pytorch_model\.bin\)"),
    ]
    for edit, match in cases:
        for read in readers:
            d = edited(layout, edit)
            with pytest.raises(ValueError, match=match):
                read(d)


def _weight_bytes(folder: Path) -> int:
    return sum(t.nbytes for p in folder.glob("*.safetensors") for t in load_file(str(p)).values())


def test_progress_callable_sees_every_tensor_and_byte(tiny):
    calls = []
    bundle = af3.load(tiny["sharded"], progress=lambda *a: calls.append(a))
    n = len(bundle.model.state_dict())
    total = _weight_bytes(tiny["sharded"])
    assert [c[0] for c in calls] == list(range(1, n + 1))
    assert {c[1] for c in calls} == {n} and {c[3] for c in calls} == {total}
    assert calls[-1][2] == total and all(a[2] < b[2] for a, b in itertools.pairwise(calls))


def test_progress_true_draws_on_stderr(tiny, capsys):
    af3.load(tiny["af3"], progress=True)
    err = capsys.readouterr().err
    assert err.startswith("af3.load: ") and err.rstrip().endswith("(100%)"), err


def test_progress_default_only_for_large_checkpoints_on_a_terminal(tiny, monkeypatch):
    import io
    import sys

    import af3.checkpoint

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    af3.load(tiny["af3"])  # a tiny checkpoint: quiet even on a terminal
    assert term.getvalue() == ""
    monkeypatch.setattr(af3.checkpoint, "PROGRESS_MIN_BYTES", 1)
    af3.load(tiny["af3"])
    assert "\raf3.load: " in term.getvalue() and term.getvalue().endswith("(100%)\n")
    af3.load(tiny["af3"], progress=False)
    assert term.getvalue().count("(100%)") == 1


def test_progress_of_the_wrong_type(tiny):
    with pytest.raises(TypeError, match="progress must be"):
        af3.load(tiny["af3"], progress="yes")
