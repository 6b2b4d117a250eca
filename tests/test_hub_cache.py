"""Checkpoints in the HF hub cache layout (`hf download` without --local-dir, `snapshot_download`).

models--<org>--<name>/blobs/<hash> holds the files; models--<org>--<name>/snapshots/<rev>/<file>
are relative links `../../blobs/<hash>`. Links inside the repository folder are followed; a link
that leaves it is refused, by weights_convert and by af3.load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import af3
from weights_convert.convert import convert

REV = "0123456789abcdef0123456789abcdef01234567"


def as_hub_cache(folder: Path, cache: Path, repo: str = "models--nvidia--audio-flamingo-3-hf") -> Path:
    """Lay `folder`'s files out as the hub cache does; returns the snapshot folder."""
    blobs, snapshot = cache / repo / "blobs", cache / repo / "snapshots" / REV
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (cache / repo / "refs").mkdir()
    (cache / repo / "refs" / "main").write_text(REV)
    for p in sorted(folder.iterdir()):
        data = p.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snapshot / p.name)
    return snapshot


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from tests.tiny_checkpoint import write_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("hub")
    hf = write_tiny_hf_checkpoint(root / "hf", style="new", shards=2)
    convert(hf, root / "af3", max_shard_size=100_000)
    return root


def _leave_repo(snapshot: Path, outside: Path) -> str:
    """Point the first shard's link at a copy of it outside the repository folder."""
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    shard = min(set(index["weight_map"].values()))
    shutil.copyfile(snapshot / shard, outside)
    (snapshot / shard).unlink()
    os.symlink(os.path.relpath(outside, snapshot), snapshot / shard)
    return shard


def test_weights_convert_reads_a_hub_snapshot(sharded, tmp_path):
    snapshot = as_hub_cache(sharded / "hf", tmp_path / "hub")
    assert (snapshot / "model-00001-of-00002.safetensors").is_symlink()
    convert(snapshot, tmp_path / "af3")
    want, got = af3.load(sharded / "af3").model.state_dict(), af3.load(tmp_path / "af3").model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_af3_load_reads_a_hub_snapshot(sharded, tmp_path):
    snapshot = as_hub_cache(sharded / "af3", tmp_path / "hub", "models--someone--af3-tiny")
    assert len(list(snapshot.glob("model-*.safetensors"))) > 1
    want, got = af3.load(sharded / "af3").model.state_dict(), af3.load(snapshot).model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_links_that_leave_the_repository_are_refused(sharded, tmp_path):
    hf = as_hub_cache(sharded / "hf", tmp_path / "hub-hf")
    shard = _leave_repo(hf, tmp_path / "elsewhere.safetensors")
    with pytest.raises(ValueError, match=f"shard '{shard}' is a link to .*elsewhere.safetensors, outside"):
        convert(hf, tmp_path / "af3")
    assert not (tmp_path / "af3").exists()
    ours = as_hub_cache(sharded / "af3", tmp_path / "hub-af3", "models--someone--af3-tiny")
    shard = _leave_repo(ours, tmp_path / "elsewhere2.safetensors")
    with pytest.raises(ValueError, match=f"shard '{shard}' is a link to .*elsewhere2.safetensors, outside"):
        af3.load(ours)
    # Outside a hub cache the checkpoint folder itself is the limit, as before.
    plain = shutil.copytree(sharded / "af3", tmp_path / "plain")
    shard = _leave_repo(plain, tmp_path / "elsewhere3.safetensors")
    with pytest.raises(ValueError, match="outside"):
        af3.load(plain)
