"""Peak memory of conversion and loading, measured by the process doing the work.

A synthetic ~2 GB float32 HF checkpoint (no tensor over 64 MB) is written once, tensor by tensor.
Each measurement runs in a fresh interpreter that imports everything first, records
`ru_maxrss`, does the work, and records it again: the difference is what the work cost.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.tiny_tokenizer import (
    TINY_AUDIO_TOKEN_ID,
    TINY_VOCAB_SIZE,
    write_tiny_tokenizer,
)
from weights_convert.safetensors_io import PlannedTensor

REPO = Path(__file__).resolve().parents[1]
GB = 10**9
MB = 10**6

# Shaped like a small Qwen2 + a one-layer Whisper encoder; 10 decoder layers make ~2.1 GB in float32.
AUDIO = {"num_mel_bins": 128, "d_model": 1280, "encoder_layers": 1, "encoder_attention_heads": 20,
         "encoder_ffn_dim": 5120, "max_source_positions": 1500}
TEXT = {"vocab_size": 7680, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 10,
        "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}


def _hf_shapes() -> dict[str, tuple[int, ...]]:
    """Old-style HF names and shapes of the synthetic model, from transformers on the meta device."""
    from transformers import (
        AudioFlamingo3Config,
        AudioFlamingo3ForConditionalGeneration,
    )

    config = AudioFlamingo3Config(audio_config=AUDIO, text_config=TEXT, audio_token_id=TINY_AUDIO_TOKEN_ID)
    with torch.device("meta"):
        model = AudioFlamingo3ForConditionalGeneration(config)
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            k = "language_model.lm_head.weight"
        elif k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        else:
            k = k.removeprefix("model.")
        out[k] = tuple(v.shape)
    config_dict = config.to_dict()
    return out, config_dict


def write_sparse_safetensors(path: Path, plan: list[PlannedTensor]) -> None:
    """A valid safetensors file whose data are all zeros, left as a hole: instant to write."""
    header, offset = {}, 0
    for t in plan:
        header[t.name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory) -> Path:
    """The synthetic HF checkpoint: one sparse 2.1 GB model.safetensors (reading it costs no disk)."""
    assert TINY_AUDIO_TOKEN_ID < TEXT["vocab_size"] and TINY_VOCAB_SIZE <= TEXT["vocab_size"]
    root = tmp_path_factory.mktemp("big") / "hf"
    root.mkdir()
    shapes, config = _hf_shapes()
    config["dtype"] = "float32"
    (root / "config.json").write_text(json.dumps(config))
    write_tiny_tokenizer(root)
    plan = [PlannedTensor(k, torch.float32, s) for k, s in shapes.items()]
    assert max(t.nbytes for t in plan) <= 64 * MB
    write_sparse_safetensors(root / "model.safetensors", plan)
    assert (root / "model.safetensors").stat().st_size > 2 * GB
    return root


def measure(code: str) -> dict:
    """Run `code` after `setup` in a fresh interpreter; it must print one JSON line."""
    prelude = textwrap.dedent("""
        import json, resource, sys
        import torch, safetensors, af3, af3.checkpoint, af3.model, af3.generation
        import weights_convert.convert
        def maxrss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        base = maxrss()
    """)
    r = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def conversion(big_hf) -> dict:
    """Converts the synthetic checkpoint once; {"dst": Path, "rise": peak RSS rise in bytes}."""
    dst = big_hf.parent / "af3"
    r = measure(f"""
        s = weights_convert.convert.convert({str(big_hf)!r}, {str(dst)!r}, max_shard_size=256 * 10**6)
        print(json.dumps({{"rise": maxrss() - base, "summary": s}}))
    """)
    return {"dst": dst, "rise": r["rise"]}


@pytest.fixture(scope="module")
def converted(conversion) -> Path:
    return conversion["dst"]


@pytest.mark.slow
def test_conversion_streams(conversion):
    dst, rise = conversion["dst"], conversion["rise"]
    files = sorted(p.name for p in dst.glob("*.safetensors"))
    assert len(files) >= 8 and all((dst / f).stat().st_size <= 256 * MB for f in files)
    # The source is 2.1 GB: holding it, or a whole output shard, would show here.
    print(f"\nconversion of a 2.1 GB checkpoint raised peak RSS by {rise / GB:.2f} GB")  # seen with pytest -s
    assert rise < 0.6 * GB, f"conversion raised peak RSS by {rise / GB:.2f} GB"


@pytest.mark.slow
def test_load_peak_memory(converted):
    ckpt_bytes = sum(p.stat().st_size for p in converted.glob("*.safetensors"))
    r = measure(f"""
        bundle = af3.load({str(converted)!r})
        # Touch every weight, so that lazily mapped pages count too.
        total = sum(float(p.float().sum()) if p.numel() < 2**22 else float(p.sum()) for p in bundle.model.parameters())
        print(json.dumps({{"rise": maxrss() - base, "dtype": str(next(bundle.model.parameters()).dtype)}}))
    """)
    assert r["dtype"] == "torch.float32"
    print(f"\nloading a {ckpt_bytes / GB:.2f} GB checkpoint raised peak RSS by {r['rise'] / GB:.2f} GB "
          f"({r['rise'] / ckpt_bytes:.2f}x)")  # seen with pytest -s
    assert r["rise"] <= 1.2 * ckpt_bytes, f"load raised peak RSS by {r['rise'] / ckpt_bytes:.2f}x the checkpoint"


@pytest.mark.slow
def test_killed_conversion_leaves_no_destination(big_hf, tmp_path):
    dst = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "weights_convert", str(big_hf), str(dst),
                          "--max-shard-size", "256MB"], cwd=REPO, env=env,
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    line = p.stderr.readline()  # the first progress line: tensors are being written
    assert "tensors" in line, line
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    time.sleep(0.1)
    assert not dst.exists()
    leftovers = [x.name for x in tmp_path.iterdir()]
    assert all(x.startswith(".killed.partial-") for x in leftovers)  # only the hidden work dir
