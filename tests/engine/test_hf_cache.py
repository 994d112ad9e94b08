"""Adapters by Hugging Face id from a hub cache laid out on disk as ``huggingface_hub`` lays it
out (``models--org--name/{refs/main, snapshots/<rev>/* -> ../../blobs/<hash>}``; no network)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from slora_backend import Engine, EngineConfig, SamplingParams
from slora_backend.adapters.hf_cache import HfAdapterCache, is_hf_id
from slora_backend.errors import AdapterNotFoundError
from tests.conftest import make_adapter

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)
REVISION = "0123456789abcdef0123456789abcdef01234567"


def lay_out(cache: Path, repo_id: str, adapter: Path, revision: str = REVISION) -> Path:
    """``adapter``'s files in ``cache`` the way the hub client stores a download."""
    org, name = repo_id.split("/")
    repo = cache / f"models--{org}--{name}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in adapter.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, repo / "blobs" / digest)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snapshot


@pytest.fixture(scope="module")
def adapter(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf-adapter") / "lora"
    return make_adapter(tiny_models["gqa"], out, 8, ["q_proj", "v_proj"], 16, seed=21, scale=3.0)


def test_hf_ids():
    assert is_hf_id("acme/tiny-lora") and is_hf_id("A.b_c/x-1.2")
    for bad in ("tiny", "a/b/c", "/abs", "a/", "../x", "a/..", "a/.hidden", "-a/b", "a b/c", "a/" + "x" * 97):
        assert not is_hf_id(bad), bad


def test_snapshot_resolution_and_confinement(tmp_path, adapter):
    cache = tmp_path / "hub"
    snapshot = lay_out(cache, "acme/tiny-lora", adapter)
    hf = HfAdapterCache(cache)
    assert hf.snapshot("acme/tiny-lora") == snapshot.resolve()
    with pytest.raises(AdapterNotFoundError, match="not in the Hugging Face cache"):
        hf.snapshot("acme/other")
    # no refs/main: the only snapshot
    (snapshot.parent.parent / "refs" / "main").unlink()
    assert hf.snapshot("acme/tiny-lora") == snapshot.resolve()
    # a weights file that leads outside the cache
    outside = tmp_path / "outside.safetensors"
    shutil.copy(adapter / "adapter_model.safetensors", outside)
    escape = lay_out(cache, "acme/escape", adapter)
    (escape / "adapter_model.safetensors").unlink()
    (escape / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(AdapterNotFoundError, match="leads outside the Hugging Face cache"):
        hf.snapshot("acme/escape")
    # a pickle only: refused
    pickled = lay_out(cache, "acme/pickled", adapter)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(AdapterNotFoundError, match="only safetensors adapters are read"):
        hf.snapshot("acme/pickled")
    # a revision that tries to climb out
    bad_ref = lay_out(cache, "acme/badref", adapter)
    (bad_ref.parent.parent / "refs" / "main").write_text("../../../..")
    with pytest.raises(AdapterNotFoundError, match="refs/main holds no revision"):
        hf.snapshot("acme/badref")


def test_engine_serves_an_adapter_by_hf_id(tiny_models, tmp_path, adapter):
    root = tmp_path / "root"
    shutil.copytree(adapter, root / "local")
    cache = tmp_path / "hub"
    lay_out(cache, "acme/tiny-lora", adapter)
    model = str(tiny_models["gqa"])

    off = Engine(EngineConfig(base_model=model, adapter_root=str(root), block_tokens=4))
    with pytest.raises(AdapterNotFoundError):
        off.resolve_adapter("acme/tiny-lora")
    off.close()

    engine = Engine(EngineConfig(base_model=model, adapter_root=str(root), block_tokens=4,
                                 hf_hub_cache=str(cache)))
    prompts = ["one two three"] * 3
    base, local, by_id = engine.generate(prompts, PARAMS, [None, "local", "acme/tiny-lora"])
    assert by_id.token_ids == local.token_ids != base.token_ids
    info = engine.describe_adapter("acme/tiny-lora")
    assert info.path.startswith(str(cache.resolve())) and info.rank == 8
    saved = json.loads((root / "registry.json").read_text())["adapters"]
    assert "local" in saved and "acme/tiny-lora" not in saved  # ids resolve again by id
    engine.close()
    assert os.path.isdir(cache)
