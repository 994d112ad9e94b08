"""End-to-end fixtures: a real tritonserver (started by the project's launcher code on free ports,
its process group stopped after the module) and the adapters it serves.

The tiny base model is the session's random GQA model in Hugging Face format (peaked logits, so
greedy comparisons are meaningful) with the SmolLM2 tokenizer; adapters are random PEFT adapters
of different ranks and targets made for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from slora_backend.launcher import ServeOptions, TritonServer, free_ports
from tests.conftest import make_adapter, make_tiny_model

# Adapters for the tiny GQA model: ranks 4..32, different target sets, one rsLoRA.
ADAPTERS = {
    "r8-qv": dict(rank=8, targets=["q_proj", "v_proj"], alpha=16),
    "r16-attn-rs": dict(rank=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"], alpha=16,
                        rslora=True),
    "r4-mlp": dict(rank=4, targets=["gate_proj", "up_proj", "down_proj"], alpha=8),
    "r32-all": dict(rank=32, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"], alpha=32),
}
SERVER_READY_TIMEOUT = 240.0


@pytest.fixture(scope="session")
def tiny_gqa(tiny_models) -> Path:
    return tiny_models["gqa"]


@pytest.fixture(scope="session")
def adapter_pool(tmp_path_factory, tiny_gqa, tiny_models) -> Path:
    """Pristine adapters, copied into each server's own root (registry.json is per root).

    Besides the good adapters: ``corrupt`` (truncated safetensors), ``other-base`` (made for
    the MHA model: wrong shapes), ``bin-only`` (a pickle, refused), and a symlink leaving the root.
    """
    pool = tmp_path_factory.mktemp("adapter-pool")
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        make_adapter(tiny_gqa, pool / name, seed=10 + i, scale=3.0, **kw)
    shutil.copytree(pool / "r8-qv", pool / "corrupt")
    weights = pool / "corrupt" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    other = tmp_path_factory.mktemp("other-base")
    make_tiny_model(other / "model", "mha", tiny_gqa, seed=5)
    make_adapter(other / "model", pool / "other-base", rank=8, targets=["k_proj", "v_proj"],
                 alpha=16, seed=3)
    shutil.copytree(pool / "r8-qv", pool / "bin-only")
    (pool / "bin-only" / "adapter_model.safetensors").rename(pool / "bin-only" / "adapter_model.bin")
    return pool


def make_adapter_root(pool: Path, dest: Path, outside: Path | None = None) -> Path:
    """A fresh adapter root holding copies of the pool, plus ``escape`` -> a directory outside."""
    shutil.copytree(pool, dest)
    if outside is not None:
        (dest / "escape").symlink_to(outside, target_is_directory=True)
    return dest


def server_options(base_model: str | Path, adapter_root: Path, tokenizer: Path | None = None,
                   **overrides) -> ServeOptions:
    http, grpc, metrics = free_ports(3)
    return ServeOptions(
        base_model=str(base_model), tokenizer=str(tokenizer) if tokenizer else None,
        adapter_root=str(adapter_root), http_port=http, grpc_port=grpc, metrics_port=metrics,
        host="127.0.0.1", device="cpu", dtype="float32", kernel_backend="torch",
        tritonserver_args=["--exit-timeout-secs=10"],
        log_verbose=int(os.environ.get("SLORA_TEST_LOG_VERBOSE", "0")), **overrides,
    )


@contextlib.contextmanager
def running_server(options: ServeOptions, log_file: Path) -> Iterator[TritonServer]:
    server = TritonServer(options, log_file=log_file)
    server.start()
    try:
        server.wait_ready(SERVER_READY_TIMEOUT)
        yield server
    finally:
        server.stop()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} for the slora_ families."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("slora_"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series of ``name`` whose labels include ``labels``."""
    total, found = 0.0, False
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
            found = True
    assert found, f"metric {name}{labels} not exported; have {sorted(values)[:20]}"
    return total


def http_post(url: str, body: dict | bytes, timeout: float = 60) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def sse_events(body: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in body.splitlines()
            if line.startswith("data: ")]


def object_array(*values: bytes) -> np.ndarray:
    return np.array(list(values), dtype=np.object_)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
