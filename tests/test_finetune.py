"""examples/finetune.py and af3.finetune on a tiny checkpoint: learning, resume, DDP, refusals."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file

import af3
from af3 import finetune, lora
from tests.test_examples import example
from tests.tiny_tokenizer import TINY_TOKEN_IDS
from weights_convert.convert import convert

REPO = Path(__file__).resolve().parent.parent
PROMPT = "What is it?"
# Each clip differs in pitch and length; the answers share no first token.
CLIPS = {"dog.wav": (220, 0.4, "A dog."), "rain.wav": (880, 1.0, "The rain."), "music.wav": (3000, 1.6, "Music.")}


def conversation(path: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "audio", "path": path}, {"type": "text", "text": PROMPT}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from tests.tiny_checkpoint import write_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("finetune")
    write_tiny_hf_checkpoint(root / "hf", vocab_size=max(TINY_TOKEN_IDS.values()) + 1)
    convert(root / "hf", root / "ckpt")
    lines = []
    for name, (hz, seconds, answer) in CLIPS.items():
        t = np.arange(int(16000 * seconds)) / 16000
        soundfile.write(str(root / name), (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16000)
        lines.append(json.dumps({"messages": conversation(name, answer)}))  # paths relative to the manifest
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root


def finetune_main(toy: Path, output: Path, *extra: str) -> int:
    return example("finetune").main([str(toy / "train.jsonl"), "--checkpoint", str(toy / "ckpt"),
                                     "--output", str(output), *extra])


def losses(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"step \d+/\d+  loss (\S+)", text)]


def test_toy_manifest_learns_its_answers(toy, tmp_path, capsys) -> None:
    """60 steps of batch 3 (LoRA on the decoder and the LM head): loss / 10 or better, answers exact."""
    rc = finetune_main(toy, tmp_path / "run", "--steps", "60", "--batch-size", "3", "--lr", "5e-3",
                       "--lora-dropout", "0", "--lora-targets", "decoder,decoder.lm_head", "--log-every", "1",
                       "--eval-manifest", str(toy / "train.jsonl"))
    out = capsys.readouterr().out
    assert rc == 0, out
    first, last = losses(out)[0], losses(out)[-1]
    assert last <= first / 10, out
    assert re.search(r"step 60/60  loss \S+  lr \S+  \d+ tok/s  eta 0:00:00", out)
    eval_loss = float(re.findall(r"eval loss (\S+)", out)[-1])
    assert eval_loss <= first / 10

    m = af3.load(toy / "ckpt")
    assert len(lora.load_adapter(m.model, tmp_path / "run" / "final")) == 2 * 7 + 1
    for name, (_, _, answer) in CLIPS.items():
        assert m.chat(conversation(str(toy / name)), do_sample=False, max_new_tokens=8) == answer


def test_resume_continues_exactly(toy, tmp_path, capsys) -> None:
    args = ("--steps", "4", "--batch-size", "1", "--grad-accum", "2", "--save-every", "2", "--warmup-steps", "1",
            "--lr", "1e-2", "--lora-dropout", "0.3", "--gradient-checkpointing", "--lora-targets",
            "decoder,projector")
    assert finetune_main(toy, tmp_path / "run", *args) == 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-000002", "final"]
    uninterrupted = {f: load_file(str(tmp_path / "run" / "final" / f))
                     for f in (lora.WEIGHTS_FILE, finetune.OPTIMIZER_FILE)}
    shutil.rmtree(tmp_path / "run" / "final")  # as if stopped after step 3

    assert finetune_main(toy, tmp_path / "run", *args) == 2  # checkpoints there: resume or choose another
    assert "pass --resume to continue" in capsys.readouterr().err
    assert finetune_main(toy, tmp_path / "run", *args[:-1], "decoder", "--resume") == 2
    assert "was made with other settings {'lora_targets'" in capsys.readouterr().err

    assert finetune_main(toy, tmp_path / "run", *args, "--resume") == 0
    assert "resumed from" in capsys.readouterr().out
    for f, tensors in uninterrupted.items():
        resumed = load_file(str(tmp_path / "run" / "final" / f))
        assert resumed.keys() == tensors.keys()
        for k, v in tensors.items():
            assert torch.equal(resumed[k], v), (f, k)
    assert any(v.abs().max() > 0 for k, v in tensors.items() if "lora_B" in k)
    # A finished run resumed: it starts from final/ at its last step and changes nothing.
    assert finetune_main(toy, tmp_path / "run", *args, "--resume") == 0
    assert "final at step 4" in capsys.readouterr().out
    again = load_file(str(tmp_path / "run" / "final" / lora.WEIGHTS_FILE))
    assert all(torch.equal(again[k], v) for k, v in uninterrupted[lora.WEIGHTS_FILE].items())


def test_two_processes_equal_one_process_on_the_combined_batch(toy, tmp_path) -> None:
    """torchrun --nproc-per-node 2 (gloo, CPU), one step of batch 1 each == one process, batch 2.

    The answers differ in length, so a per-process mean would weigh tokens differently from the
    combined batch; clipping is off and the optimizer's first moment (0.1 x the gradient) is
    compared too, since Adam's first update does not change with the gradient's scale.
    """
    lines = [json.dumps({"messages": conversation(str(toy / "dog.wav"), "A dog.")}),
             json.dumps({"messages": conversation(str(toy / "rain.wav"), "The rain on the window, and a dog.")})]
    (tmp_path / "two.jsonl").write_text("\n".join(lines) + "\n")
    common = [str(tmp_path / "two.jsonl"), "--checkpoint", str(toy / "ckpt"), "--steps", "1", "--lr", "1e-2",
              "--lora-dropout", "0", "--lora-targets", "decoder,projector", "--device", "cpu",
              "--max-grad-norm", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = str(REPO / "examples" / "finetune.py")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--standalone", script, *common, "--batch-size", "1", "--output",
                          str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "on 2 process(es)" in ddp.stdout
    single = subprocess.run([sys.executable, script, *common, "--batch-size", "2", "--output",
                             str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    # Logged to 4 decimals: equal losses that round on either side of a last digit print 1e-4 apart.
    assert losses(ddp.stdout) == pytest.approx(losses(single.stdout), abs=1.01e-4)
    # Gradients (through Adam's moments) to rounding; weights to 1% of a step, because Adam's first
    # step is lr * g / (|g| + 1e-8), which rounding moves visibly for the few g near 1e-8.
    for f, tol in ((finetune.OPTIMIZER_FILE, 1e-5), (lora.WEIGHTS_FILE, 1e-2 * 1e-2)):
        a = load_file(str(tmp_path / "ddp" / "final" / f))
        b = load_file(str(tmp_path / "one" / "final" / f))
        assert a.keys() == b.keys()
        for k in a:
            scale = b[k].abs().max().item() if f == finetune.OPTIMIZER_FILE else 1.0
            assert (a[k] - b[k]).abs().max() <= tol * scale, k
        assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)


def test_train_projector_in_full(toy, tmp_path, capsys) -> None:
    assert finetune_main(toy, tmp_path / "run", "--train", "projector", "--steps", "2", "--batch-size", "3",
                         "--lr", "1e-3") == 0
    capsys.readouterr()
    final = tmp_path / "run" / "final"
    assert not (final / lora.CONFIG_FILE).exists()
    base = af3.load(toy / "ckpt").model
    trained = af3.load(toy / "ckpt").model
    assert finetune.load_parts(trained, final) == sorted(n for n, _ in base.projector.named_parameters(prefix="projector"))
    for (name, p), q in zip(base.named_parameters(), trained.parameters()):
        assert torch.equal(p, q) != name.startswith("projector."), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 weights under bf16 autocast); "
                    "the CPU tests cover the same loop in fp32 and CPU bf16")
def test_bf16_autocast_on_gpu_learns(toy, tmp_path, capsys) -> None:
    rc = finetune_main(toy, tmp_path / "run", "--device", "cuda:0", "--steps", "30", "--batch-size", "3", "--lr", "5e-3",
                       "--lora-dropout", "0", "--lora-targets", "decoder,decoder.lm_head", "--gradient-checkpointing")
    out = capsys.readouterr().out
    assert rc == 0 and "cuda:0, bfloat16" in out, out
    assert losses(out)[-1] <= losses(out)[0] / 3, out
    adapter = load_file(str(tmp_path / "run" / "final" / lora.WEIGHTS_FILE))
    assert all(v.dtype == torch.float32 for v in adapter.values())  # factors stay fp32 over bf16 weights


def test_cpu_bf16_weights_train_under_autocast(toy, tmp_path, capsys) -> None:
    """--dtype bfloat16 on the CPU: bf16 frozen weights, the projector trained in fp32 beside them."""
    assert finetune_main(toy, tmp_path / "run", "--dtype", "bfloat16", "--train", "lora,projector", "--steps", "1",
                         "--batch-size", "3") == 0
    assert "cpu, bfloat16" in capsys.readouterr().out
    parts = load_file(str(tmp_path / "run" / "final" / finetune.PARTS_FILE))
    assert sorted(parts) == ["projector.linear1.bias", "projector.linear1.weight", "projector.linear2.bias",
                             "projector.linear2.weight"]
    assert all(v.dtype == torch.float32 for v in parts.values())


def test_bad_examples_refused_before_training_with_line_numbers(toy, tmp_path, capsys) -> None:
    soundfile.write(str(tmp_path / "long.wav"), np.zeros(8000 * 601, dtype=np.int16), 8000, subtype="PCM_16")
    shutil.copy(toy / "dog.wav", tmp_path / "dog.wav")
    lines = [
        json.dumps({"messages": conversation("dog.wav", "A dog.")}),  # fine
        "{not json",
        json.dumps({"messages": conversation("dog.wav")}),  # nothing to learn
        json.dumps({"messages": conversation("missing.wav", "A dog.")}),
        json.dumps({"messages": conversation("long.wav", "Long.")}),
        "",
        json.dumps({"messages": conversation("dog.wav", "dog " * 600)}),  # over the tiny context of 512
        json.dumps({"conversation": conversation("dog.wav", "A dog.")}),
    ]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    rc = example("finetune").main([str(tmp_path / "bad.jsonl"), "--checkpoint", str(toy / "ckpt"),
                                   "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 1
    bad = str(tmp_path / "bad.jsonl")
    assert "6 of the manifest's examples cannot be used" in err
    assert f"""{bad}:8: a JSON object needs "messages" (a list of messages), got keys ['conversation']""" in err
    assert f"{bad}:2: not valid JSON" in err
    assert f"{bad}:3: no assistant turn" in err
    assert re.search(rf"{re.escape(bad)}:4: .*missing\.wav", err)
    assert f"{bad}:5: clip" in err and "is 601.0 s long; AF3 hears at most 600 s" in err
    assert re.search(rf"{re.escape(bad)}:7: .*is \d+ tokens .* context is 512 tokens", err)
    assert f"{bad}:1:" not in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_schedule_and_order() -> None:
    config = finetune.TrainConfig(steps=10, warmup_steps=2, lr=1.0)
    lrs = [finetune.learning_rate(s, config) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 7 / 8)))
    order = finetune.sample_order(3, seed=0, start=0, count=6)
    assert sorted(order[:3]) == [0, 1, 2] == sorted(order[3:])  # every epoch sees every example once
    assert finetune.sample_order(3, 0, 4, 2) == order[4:6]
    with pytest.raises(ValueError, match=r"train must name 'lora' and/or parts of .* got \['head'\]"):
        finetune.TrainConfig(train=("head",))


@pytest.mark.parametrize("targets", [lora.DECODER_TARGETS, ("decoder.layers.*.attn.q", "decoder.layers.*.mlp.up")])
def test_memory_estimate_counts_the_adapters_add_lora_makes(targets) -> None:
    """The estimate's LoRA parameters are those add_lora creates, the parts of merged linears
    (attn.qkv) counted at their own sizes."""
    from tests.model_helpers import hf_to_af3_model, tiny_hf_model

    model = hf_to_af3_model(tiny_hf_model(seed=0))
    estimate = finetune.memory_estimate(model, rank=4, targets=targets)["lora"]
    lora.add_lora(model, rank=4, targets=targets)
    made = sum(p.numel() for a in lora.lora_layers(model).values() for p in (a.lora_A, a.lora_B))
    assert estimate == made * 4 * 4  # fp32 factors, their gradients and AdamW's two moments


def test_load_parts_reads_parameter_names_and_per_projection_names(tmp_path) -> None:
    """save_checkpoint names fully trained tensors as the model's parameters (attn.qkv.weight);
    parts files that name q, k and v apart (as checkpoints do, and af3 did before merging them)
    load into the same rows."""
    from safetensors.torch import save_file

    from tests.model_helpers import hf_to_af3_model, tiny_hf_model

    trained = hf_to_af3_model(tiny_hf_model(seed=1))
    layer = "decoder.layers.0"
    apart = {k: v.clone() for k, v in trained.state_dict().items() if k.startswith(f"{layer}.attn.")}
    merged = {f"{layer}.attn.qkv.weight": trained.decoder.layers[0].attn.qkv.weight.detach().clone(),
              f"{layer}.mlp.up.weight": trained.decoder.layers[0].mlp.up.weight.detach().clone()}
    model = hf_to_af3_model(tiny_hf_model(seed=2))
    for i, parts in enumerate((apart, merged)):
        (tmp_path / str(i)).mkdir()
        save_file(parts, str(tmp_path / str(i) / finetune.PARTS_FILE))
        assert finetune.load_parts(model, tmp_path / str(i)) == sorted(parts)
    for name in ("attn.qkv.weight", "attn.qkv.bias", "attn.o.weight", "mlp.up.weight"):
        assert torch.equal(model.get_parameter(f"{layer}.{name}"), trained.get_parameter(f"{layer}.{name}")), name
    assert not torch.equal(model.decoder.layers[0].mlp.down.weight, trained.decoder.layers[0].mlp.down.weight)


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--max-grad-norm", "nan"),
                                         ("--weight-decay", "nan"), ("--epochs", "inf"), ("--lora-alpha", "inf"),
                                         ("--seed", str(2**64))])
def test_non_finite_settings_and_out_of_range_seeds_are_usage_errors(toy, tmp_path, capsys, flag, value) -> None:
    # nan or inf trained to nan adapters and saved them with exit 0; a 2**64 seed was a traceback.
    with pytest.raises(SystemExit) as e:
        finetune_main(toy, tmp_path / "run", flag, value)
    assert e.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["lr", "weight_decay", "max_grad_norm", "lora_alpha", "lora_dropout"])
def test_train_config_refuses_nan_and_inf(name) -> None:
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            finetune.TrainConfig(**{name: value})


def test_a_diverged_run_stops_and_saves_nothing_more(toy, tmp_path, capsys) -> None:
    # lr 1e30: the first step's update is huge, and the second step's loss is nan or inf.
    rc = finetune_main(toy, tmp_path / "run", "--steps", "3", "--lr", "1e30", "--max-grad-norm", "0",
                       "--save-every", "1")
    captured = capsys.readouterr()
    assert rc == 2, captured.out
    assert re.search(r"error: step \d: the loss is (nan|inf), so training diverged", captured.err), captured.err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-000001"]  # before it diverged


def test_output_and_device_problems_are_found_before_loading(toy, tmp_path, capsys, monkeypatch) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for output, says in ((a_file, "exists and is not a folder"), (a_file / "sub", f"{a_file} is not a folder")):
        assert finetune_main(toy, output) == 2
        assert f"--output {output}: {says}" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert finetune_main(toy, tmp_path / "run", "--device", "cuda") == 2
    assert "--device cuda: CUDA is not available here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_damaged_checkpoint_file_is_named_on_resume(toy, tmp_path, capsys) -> None:
    assert finetune_main(toy, tmp_path / "run", "--steps", "2", "--save-every", "1") == 0
    shutil.rmtree(tmp_path / "run" / "final")
    adapter = tmp_path / "run" / "checkpoint-000001" / lora.WEIGHTS_FILE
    adapter.write_bytes(adapter.read_bytes()[:100])  # cut short
    capsys.readouterr()
    assert finetune_main(toy, tmp_path / "run", "--steps", "2", "--save-every", "1", "--resume") == 2
    assert f"error: {adapter}: not a readable safetensors file" in capsys.readouterr().err
    adapter.unlink()
    assert finetune_main(toy, tmp_path / "run", "--steps", "2", "--save-every", "1", "--resume") == 2
    assert f"error: {adapter} not found" in capsys.readouterr().err


def test_resume_with_nothing_to_resume_says_so(toy, tmp_path, capsys) -> None:
    assert finetune_main(toy, tmp_path / "run", "--steps", "1", "--resume") == 0
    assert f"nothing to resume in {tmp_path / 'run'}: starting at step 0" in capsys.readouterr().out


def test_a_setting_refused_by_the_library_is_named_as_its_flag(toy, tmp_path, capsys) -> None:
    assert finetune_main(toy, tmp_path / "run", "--weight-decay", "-1") == 2
    err = capsys.readouterr().err
    assert "--weight-decay" in err and "weight_decay" not in err.replace("--weight-decay", ""), err
