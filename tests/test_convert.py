"""weights_convert: tiny HF (both name styles, single and sharded) and NVIDIA checkpoints made with
transformers, converted and loaded, give transformers' logits; LoRA merge; every error path."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import af3
from tests.tiny_checkpoint import (
    tiny_hf_model,
    write_tiny_hf_checkpoint,
    write_tiny_nvidia_checkpoint,
)
from tests.tiny_tokenizer import TINY_AUDIO_TOKEN_ID
from weights_convert.__main__ import main, parse_size
from weights_convert.convert import convert, verify_written
from weights_convert.safetensors_io import (
    PlannedTensor,
    ShardWriter,
    plan_shards,
    read_header,
)

# ---- helpers ---------------------------------------------------------------------------------


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def audio_batch(seed: int = 0):
    """Two samples: one with a 400-frame clip (100 <sound> tokens), one text-only, left padded."""
    g = torch.Generator().manual_seed(seed)
    n_audio = (400 + 1) // 4  # post-pool frames of a 400-frame window
    features = torch.randn(1, 128, 3000, generator=g)
    mask = torch.zeros(1, 3000, dtype=torch.long)
    mask[0, :400] = 1
    ids_a = torch.randint(0, 200, (1, 5), generator=g).tolist()[0]
    ids_a += [TINY_AUDIO_TOKEN_ID] * n_audio + torch.randint(0, 200, (7,), generator=g).tolist()
    ids_b = torch.randint(0, 200, (30,), generator=g).tolist()
    T = len(ids_a)
    input_ids = torch.tensor([ids_a, [0] * (T - len(ids_b)) + ids_b])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, : T - len(ids_b)] = 0
    return input_ids, attention_mask, features, mask


def assert_same_logits(bundle, hf_model, atol: float = 1e-4) -> None:
    input_ids, attention_mask, features, mask = audio_batch()
    with torch.no_grad():
        ref = hf_model(input_ids=input_ids, attention_mask=attention_mask, input_features=features,
                       input_features_mask=mask).logits
        ours = bundle.model(input_ids, attention_mask=attention_mask, input_features=features,
                            input_features_mask=mask).logits
    valid = attention_mask.bool()
    torch.testing.assert_close(ours[valid], ref[valid], atol=atol, rtol=1e-4)


# ---- conversion + parity ---------------------------------------------------------------------


@pytest.mark.parametrize(("style", "shards"), [("old", 1), ("new", 3)])
def test_hf_checkpoint_converts_and_matches_transformers(tmp_path, capsys, style, shards):
    src = write_tiny_hf_checkpoint(tmp_path / "hf", style=style, shards=shards)
    dst = tmp_path / "af3"
    rc, out, err = run_cli(capsys, src, dst, "--max-shard-size", "250KB")
    assert rc == 0, err
    assert out.count("\n") == 1 and "hf layout" in out and f"{shards} file" in out  # the summary
    assert "tensors" in err and "100%" in err  # progress
    assert (dst / "model.safetensors.index.json").is_file()
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for file in set(index["weight_map"].values()):
        assert (dst / file).stat().st_size <= 250_000 + 10_000  # + header; the largest tensor is 192 KB
    assert {p.name for p in dst.iterdir()} >= {"config.json", "tokenizer.json", "generation_config.json"}
    assert not list(tmp_path.glob(".af3.*"))  # no temporary directory left behind
    bundle = af3.load(dst)
    assert not bundle.model.training
    assert_same_logits(bundle, tiny_hf_model())


def test_nvidia_layout_converts_and_matches_transformers(tmp_path, capsys):
    hf = write_tiny_hf_checkpoint(tmp_path / "hf")
    src = write_tiny_nvidia_checkpoint(tmp_path / "nvidia", hf)
    rc, out, err = run_cli(capsys, src, tmp_path / "af3")
    assert rc == 0, err
    assert "nvidia layout" in out
    from_nvidia = tensors_of(tmp_path / "af3")
    rc, _, err = run_cli(capsys, hf, tmp_path / "af3-hf")
    assert rc == 0, err
    from_hf = tensors_of(tmp_path / "af3-hf")
    assert from_nvidia.keys() == from_hf.keys()
    for k in from_hf:
        assert torch.equal(from_nvidia[k], from_hf[k]), k
    assert_same_logits(af3.load(tmp_path / "af3"), tiny_hf_model())


def test_tied_embeddings_drop_lm_head(tmp_path, capsys):
    src = write_tiny_hf_checkpoint(tmp_path / "hf", tie_word_embeddings=True)
    rc, out, err = run_cli(capsys, src, tmp_path / "af3")
    assert rc == 0, err
    assert "lm_head.weight dropped" in out
    assert "decoder.lm_head.weight" not in tensors_of(tmp_path / "af3")
    assert_same_logits(af3.load(tmp_path / "af3"), tiny_hf_model(tie_word_embeddings=True))


def test_tied_config_with_a_different_lm_head_is_refused(tmp_path, capsys):
    src = write_tiny_hf_checkpoint(tmp_path / "hf", tie_word_embeddings=True)
    state = load_file(str(src / "model.safetensors"))
    state["language_model.lm_head.weight"] = state["language_model.lm_head.weight"] + 1
    save_file(state, str(src / "model.safetensors"))
    rc, _, err = run_cli(capsys, src, tmp_path / "af3")
    assert rc == 1 and "lm_head.weight differs" in err and "tie_word_embeddings" in err


def test_dtype_cast(tmp_path, capsys):
    src = write_tiny_hf_checkpoint(tmp_path / "hf")
    rc, out, err = run_cli(capsys, src, tmp_path / "af3", "--dtype", "bf16")
    assert rc == 0, err
    assert "bfloat16" in out
    got = tensors_of(tmp_path / "af3")
    ref = load_file(str(src / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert torch.equal(got["encoder.conv1.weight"], ref["audio_tower.conv1.weight"].to(torch.bfloat16))
    assert json.loads((tmp_path / "af3" / "config.json").read_text())["dtype"] == "bfloat16"
    bundle = af3.load(tmp_path / "af3", dtype=torch.float32)
    assert bundle.model.decoder.embed_tokens.weight.dtype == torch.float32


# ---- LoRA --------------------------------------------------------------------------------------


def write_adapter(directory: Path, weights: dict[str, torch.Tensor], *, r: int, alpha: float,
                  prefix: str, modules=("q_proj", "v_proj"), **extra) -> dict[str, tuple]:
    """A PEFT-style adapter on layers 0 and 1 of the decoder; returns HF weight name -> (A, B)."""
    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    tensors, factors = {}, {}
    for layer in (0, 1):
        for module in modules:
            hf = f"language_model.model.layers.{layer}.self_attn.{module}.weight"
            out_f, in_f = weights[hf].shape
            a, b = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
            base = f"base_model.model.{prefix}layers.{layer}.self_attn.{module}"
            tensors[f"{base}.lora_A.weight"], tensors[f"{base}.lora_B.weight"] = a, b
            factors[hf] = (a, b)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(modules), **extra}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return factors


@pytest.mark.parametrize("prefix", ["llm.model.", "language_model.model.", "model.language_model."])
def test_lora_merge_matches_the_formula(tmp_path, capsys, prefix):
    src = write_tiny_hf_checkpoint(tmp_path / "hf")
    ref = load_file(str(src / "model.safetensors"))
    factors = write_adapter(tmp_path / "think", ref, r=4, alpha=8.0, prefix=prefix)
    rc, out, err = run_cli(capsys, src, tmp_path / "af3", "--adapter", tmp_path / "think")
    assert rc == 0, err
    assert "LoRA merged into 4 weights" in out
    got = tensors_of(tmp_path / "af3")
    for hf_name, (a, b) in factors.items():
        ours = hf_name.replace("language_model.model.layers", "decoder.layers").replace("self_attn", "attn")
        ours = ours.replace("q_proj", "q").replace("v_proj", "v")
        want = ref[hf_name] + (8.0 / 4) * (b @ a)
        torch.testing.assert_close(got[ours], want, atol=1e-6, rtol=1e-6)
    # Untouched weights are copied bit for bit.
    assert torch.equal(got["decoder.layers.0.attn.k.weight"],
                       ref["language_model.model.layers.0.self_attn.k_proj.weight"])


def test_rslora_scale(tmp_path, capsys):
    src = write_tiny_hf_checkpoint(tmp_path / "hf")
    ref = load_file(str(src / "model.safetensors"))
    factors = write_adapter(tmp_path / "think", ref, r=4, alpha=8.0, prefix="llm.model.",
                            modules=("q_proj",), use_rslora=True)
    rc, _, err = run_cli(capsys, src, tmp_path / "af3", "--adapter", tmp_path / "think")
    assert rc == 0, err
    a, b = factors["language_model.model.layers.1.self_attn.q_proj.weight"]
    want = ref["language_model.model.layers.1.self_attn.q_proj.weight"] + (8.0 / 2.0) * (b @ a)
    torch.testing.assert_close(tensors_of(tmp_path / "af3")["decoder.layers.1.attn.q.weight"], want,
                               atol=1e-6, rtol=1e-6)


def test_lora_errors(tmp_path, capsys):
    src = write_tiny_hf_checkpoint(tmp_path / "hf")
    ref = load_file(str(src / "model.safetensors"))
    write_adapter(tmp_path / "dora", ref, r=2, alpha=4, prefix="llm.model.", use_dora=True)
    rc, _, err = run_cli(capsys, src, tmp_path / "o1", "--adapter", tmp_path / "dora")
    assert rc == 1 and "use_dora" in err
    write_adapter(tmp_path / "odd", ref, r=2, alpha=4, prefix="llm.model.")
    t = load_file(str(tmp_path / "odd" / "adapter_model.safetensors"))
    t["base_model.model.llm.model.layers.0.self_attn.q_proj.lora_embedding_A"] = torch.zeros(2)
    save_file(t, str(tmp_path / "odd" / "adapter_model.safetensors"))
    rc, _, err = run_cli(capsys, src, tmp_path / "o2", "--adapter", tmp_path / "odd")
    assert rc == 1 and "lora_embedding_A" in err and "not a LoRA factor" in err
    rc, _, err = run_cli(capsys, src, tmp_path / "o3", "--adapter", tmp_path / "nowhere")
    assert rc == 1 and "adapter directory not found" in err
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


# ---- errors ----------------------------------------------------------------------------------


@pytest.fixture
def hf_src(tmp_path):
    return write_tiny_hf_checkpoint(tmp_path / "hf")


def _edit(src: Path, fn) -> None:
    state = load_file(str(src / "model.safetensors"))
    fn(state)
    save_file(state, str(src / "model.safetensors"))


def expect_error(capsys, *args, contains: str | tuple[str, ...]) -> str:
    rc, out, err = run_cli(capsys, *args)
    assert rc == 1 and out == ""
    assert err.startswith("weights_convert: error: ") and "Traceback" not in err
    for c in (contains,) if isinstance(contains, str) else contains:
        assert c in err, err
    return err


def _old_af3_checkpoint(dst):
    """A stand-in for an earlier conversion: what --force may replace."""
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps({"format": "af3", "format_version": 1}))
    (dst / "model-00001-of-00003.safetensors").write_text("old")


def test_existing_destination_needs_force(tmp_path, capsys, hf_src):
    dst = tmp_path / "af3"
    _old_af3_checkpoint(dst)
    expect_error(capsys, hf_src, dst, contains=("already exists", "--force"))
    assert (dst / "model-00001-of-00003.safetensors").is_file()
    rc, _, err = run_cli(capsys, hf_src, dst, "--force")
    assert rc == 0, err
    assert not (dst / "model-00001-of-00003.safetensors").exists() and (dst / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("config", [None, "{not json", json.dumps({"model_type": "audioflamingo3"})])
def test_force_never_replaces_a_folder_that_is_not_an_af3_checkpoint(tmp_path, capsys, hf_src, config):
    dst = tmp_path / "important"
    dst.mkdir()
    (dst / "thesis.tex").write_text("years of work")
    if config is not None:
        (dst / "config.json").write_text(config)
    expect_error(capsys, hf_src, dst, "--force", contains=("not an af3 checkpoint", "remove it yourself"))
    assert (dst / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "important"]


def test_force_fills_an_empty_folder(tmp_path, capsys, hf_src):
    (tmp_path / "af3").mkdir()
    rc, _, err = run_cli(capsys, hf_src, tmp_path / "af3", "--force", "--quiet")
    assert rc == 0, err
    assert (tmp_path / "af3" / "config.json").is_file()


def test_unknown_tensor_is_named(tmp_path, capsys, hf_src):
    _edit(hf_src, lambda s: s.__setitem__("audio_tower.extra_thing.weight", torch.zeros(2)))
    expect_error(capsys, hf_src, tmp_path / "af3", contains="audio_tower.extra_thing.weight")
    assert not (tmp_path / "af3").exists()


def test_missing_tensor_is_named(tmp_path, capsys, hf_src):
    _edit(hf_src, lambda s: s.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    expect_error(capsys, hf_src, tmp_path / "af3", contains=("missing", "decoder.layers.1.mlp.up.weight"))


def test_wrong_shape_is_named(tmp_path, capsys, hf_src):
    _edit(hf_src, lambda s: s.__setitem__("multi_modal_projector.linear_2.bias", torch.zeros(7)))
    expect_error(capsys, hf_src, tmp_path / "af3", contains=("wrong shape", "projector.linear2.bias", "[7]"))


def test_pickle_only_source_is_refused(tmp_path, capsys, hf_src):
    (hf_src / "model.safetensors").unlink()
    (hf_src / "pytorch_model.bin").write_bytes(b"not read")
    expect_error(capsys, hf_src, tmp_path / "af3", contains=("pickle", "pytorch_model.bin"))


def test_index_must_name_files_inside_src(tmp_path, capsys):
    src = write_tiny_hf_checkpoint(tmp_path / "hf", shards=2)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    shutil.copy(src / index["weight_map"][name], tmp_path / "outside.safetensors")
    index["weight_map"][name] = "../outside.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(capsys, src, tmp_path / "af3", contains=("../outside.safetensors", "inside"))


def test_truncated_shard_and_bad_config(tmp_path, capsys, hf_src):
    data = (hf_src / "model.safetensors").read_bytes()
    (hf_src / "model.safetensors").write_bytes(data[:-100])
    expect_error(capsys, hf_src, tmp_path / "af3", contains="truncated")
    (hf_src / "model.safetensors").write_bytes(data)
    cfg = json.loads((hf_src / "config.json").read_text())
    del cfg["text_config"]["hidden_size"]
    (hf_src / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, hf_src, tmp_path / "af3", contains="hidden_size")


def test_not_a_checkpoint_and_missing_source(tmp_path, capsys):
    expect_error(capsys, tmp_path / "nope", tmp_path / "af3", contains="not found")
    (tmp_path / "empty").mkdir()
    expect_error(capsys, tmp_path / "empty", tmp_path / "af3", contains="no config.json")


def test_destination_inside_source_is_refused(capsys, hf_src):
    expect_error(capsys, hf_src, hf_src / "out", contains="overlaps")


def test_interrupted_conversion_leaves_no_destination(tmp_path, hf_src):
    calls = []

    def stop_halfway(done, total, *_):
        calls.append(done)
        if done == total // 2:
            raise KeyboardInterrupt("stopped half-way")

    with pytest.raises(KeyboardInterrupt, match="stopped half-way"):
        convert(hf_src, tmp_path / "af3", progress=stop_halfway)
    assert calls and not (tmp_path / "af3").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # the temporary directory is gone too


def test_written_headers_are_verified(tmp_path):
    plan = [PlannedTensor("a", torch.float32, (2, 3)), PlannedTensor("b", torch.bfloat16, (4,))]
    w = ShardWriter(tmp_path / "model.safetensors", plan)
    w.write("a", torch.ones(2, 3))
    with pytest.raises(ValueError, match="expected b"):
        w.write("b", torch.ones(4))  # float32, but bfloat16 was planned
    w.write("b", torch.ones(4, dtype=torch.bfloat16))
    w.close()
    assert load_file(str(tmp_path / "model.safetensors"))["a"].tolist() == [[1.0] * 3] * 2
    expected = {"a": (2, 3), "b": (4,)}
    verify_written(tmp_path, plan, expected)
    with pytest.raises(ValueError, match="not what was planned"):
        verify_written(tmp_path, [plan[0], PlannedTensor("b", torch.float16, (4,))], expected)
    with pytest.raises(ValueError, match="missing: c"):
        verify_written(tmp_path, plan, {**expected, "c": (1,)})


def test_reader_and_planner(tmp_path):
    t = {"x": torch.arange(6, dtype=torch.int32).reshape(2, 3), "y": torch.randn(5).to(torch.float16)}
    save_file(t, str(tmp_path / "m.safetensors"))
    header = read_header(tmp_path / "m.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in header.items()} == {
        "x": (torch.int32, (2, 3)), "y": (torch.float16, (5,))}
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_header(tmp_path / "bad.safetensors")
    plan = [PlannedTensor(str(i), torch.float32, (25,)) for i in range(5)]  # 100 bytes each
    assert [len(s) for s in plan_shards(plan, 250)] == [2, 2, 1]
    assert [len(s) for s in plan_shards(plan, 50)] == [1, 1, 1, 1, 1]  # an oversized tensor stands alone
    assert parse_size("2GB") == 2 * 10**9 and parse_size("256MiB") == 256 * 2**20
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert set(f.keys()) == {"x", "y"}


# ---- review pass: CLI arguments, adapters, replacing DST, progress ------------------------------


def test_usage_errors_are_one_line(capsys, hf_src, tmp_path):
    for args, match in (
        (["--max-shard-size", "-1GB"], "'-1GB' must be at least 1 byte"),  # argparse read -1GB as an option
        (["--max-shard-size", "2XB"], "'2XB' is not a size"),
        (["--max-shard-size", "0"], "'0' must be at least 1 byte"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
    ):
        with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
            main([str(hf_src), str(tmp_path / "af3"), *args])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err
        assert err.startswith("python -m weights_convert: error: ")
    assert parse_size("1TB") == 10**12 and parse_size("+1KiB") == 1024
    assert not (tmp_path / "af3").exists()


def test_summary_line(tmp_path, capsys, hf_src):
    rc, out, err = run_cli(capsys, hf_src, tmp_path / "af3", "--quiet")
    assert rc == 0 and err == ""
    assert out.startswith(f"converted {hf_src} (hf layout, 1 file) -> {tmp_path / 'af3'}: ")
    assert " in 1 file; " in out and "file(s)" not in out


def test_adapter_that_is_not_for_this_model(tmp_path, capsys, hf_src):
    expect_error(capsys, hf_src, tmp_path / "o", "--adapter", hf_src,
                 contains=("not a PEFT adapter directory", "adapter_config.json"))
    ref = load_file(str(hf_src / "model.safetensors"))
    write_adapter(tmp_path / "foreign", ref, r=2, alpha=4, prefix="llm.model.")
    t = load_file(str(tmp_path / "foreign" / "adapter_model.safetensors"))
    t = {k.replace("llm.model.layers", "vision_tower.blocks"): v for k, v in t.items()}
    save_file(t, str(tmp_path / "foreign" / "adapter_model.safetensors"))
    expect_error(capsys, hf_src, tmp_path / "o", "--adapter", tmp_path / "foreign",
                 contains=("adapter_model.safetensors", "vision_tower.blocks.0.self_attn.q_proj",
                           "not for this model"))
    # The same weight spelt twice (NVIDIA's and HF's names) would be merged once, silently.
    write_adapter(tmp_path / "twice", ref, r=2, alpha=4, prefix="llm.model.", modules=("q_proj",))
    t = load_file(str(tmp_path / "twice" / "adapter_model.safetensors"))
    t.update({k.replace("llm.model.", "language_model.model."): v.clone() for k, v in t.items()})
    save_file(t, str(tmp_path / "twice" / "adapter_model.safetensors"))
    expect_error(capsys, hf_src, tmp_path / "o", "--adapter", tmp_path / "twice",
                 contains=("both update", "decoder.layers.0.attn.q.weight"))
    write_adapter(tmp_path / "nan", ref, r=2, alpha=float("nan"), prefix="llm.model.")
    expect_error(capsys, hf_src, tmp_path / "o", "--adapter", tmp_path / "nan", contains="lora_alpha=nan")
    assert not (tmp_path / "o").exists()


def test_source_config_errors_name_the_source(tmp_path, capsys, hf_src):
    cfg = json.loads((hf_src / "config.json").read_text())
    cfg["text_config"]["num_attention_heads"] = "4"
    (hf_src / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, hf_src, tmp_path / "af3",
                 contains=(f"{hf_src} (hf layout), its config:", "num_attention_heads must be an integer"))


def test_force_keeps_the_old_destination_if_the_swap_fails(tmp_path, capsys, hf_src, monkeypatch):
    import os

    import weights_convert.convert as convert_module

    dst = tmp_path / "af3"
    _old_af3_checkpoint(dst)
    real_rename = os.rename

    def rename(a, b):
        if ".partial-" in str(a):
            raise OSError(28, "No space left on device")
        real_rename(a, b)

    monkeypatch.setattr(convert_module.os, "rename", rename)
    expect_error(capsys, hf_src, dst, "--force", "--quiet", contains="No space left")
    assert (dst / "model-00001-of-00003.safetensors").read_text() == "old"  # put back, not left under a hidden name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["af3", "hf"]


def test_force_replaces_a_link_not_what_it_points_to(tmp_path, capsys, hf_src):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    (tmp_path / "af3").symlink_to(target)
    rc, _, err = run_cli(capsys, hf_src, tmp_path / "af3", "--force", "--quiet")
    assert rc == 0, err  # rmtree refused the link after the new checkpoint was in place
    assert (tmp_path / "af3" / "config.json").is_file() and not (tmp_path / "af3").is_symlink()
    assert (target / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["af3", "elsewhere", "hf"]


def test_failure_removes_the_parents_it_made(tmp_path, hf_src):
    def stop(*_):
        raise KeyboardInterrupt("stopped at once")

    with pytest.raises(KeyboardInterrupt, match="stopped at once"):
        convert(hf_src, tmp_path / "new" / "deeper" / "af3", progress=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_progress_line_is_ended_before_an_error(tmp_path, hf_src, capsys, monkeypatch):
    import io

    from af3.progress import TensorProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr("af3.progress.TensorProgress", lambda: TensorProgress(term))
    data = (hf_src / "model.safetensors").read_bytes()
    calls = []

    def fail_midway(f, info):  # a read error after some progress was drawn
        calls.append(info.name)
        if len(calls) == 3:
            raise ValueError(f"{info.path}: tensor {info.name!r} is truncated")
        return real_read(f, info)

    import weights_convert.convert as convert_module

    real_read = convert_module.read_tensor
    monkeypatch.setattr(convert_module, "read_tensor", fail_midway)
    monkeypatch.setattr("time.monotonic", iter(range(0, 10**6, 10)).__next__)  # every update drawn
    assert main([str(hf_src), str(tmp_path / "af3")]) == 1
    text = term.getvalue()
    assert "\r2/" in text and "\nweights_convert: error: " in text, text
    assert (hf_src / "model.safetensors").read_bytes() == data


def test_destination_holding_the_current_directory_is_refused(tmp_path, capsys, hf_src, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("mine")
    monkeypatch.chdir(work)
    for dst in (".", str(tmp_path / "work")):  # '.' was converted in full, then failed to rename
        expect_error(capsys, hf_src, dst, "--force", contains="current directory")
    assert [p.name for p in work.iterdir()] == ["precious.txt"]


def test_malformed_index_and_sound_token(tmp_path, capsys):
    src = write_tiny_hf_checkpoint(tmp_path / "hf", shards=2)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = 3
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    # was "'<' not supported between instances of 'int' and 'str'"
    expect_error(capsys, src, tmp_path / "af3", contains=("model.safetensors.index.json", "shard 3 is not a file inside"))
    nvidia = write_tiny_nvidia_checkpoint(tmp_path / "nvidia", write_tiny_hf_checkpoint(tmp_path / "hf1"))
    tok = nvidia / "llm" / "tokenizer.json"
    t = json.loads(tok.read_text())
    for added in t["added_tokens"]:
        if added["content"] == "<sound>":
            del added["id"]
    tok.write_text(json.dumps(t))
    expect_error(capsys, nvidia, tmp_path / "af3", contains=("tokenizer.json", "'<sound>' has no integer id"))  # was a KeyError


def test_max_shard_size_true_is_not_one_byte(tmp_path, hf_src):
    with pytest.raises(ValueError, match="max_shard_size must be a positive number of bytes, got True"):
        convert(hf_src, tmp_path / "af3", max_shard_size=True)  # was one shard per tensor
    assert not (tmp_path / "af3").exists()
