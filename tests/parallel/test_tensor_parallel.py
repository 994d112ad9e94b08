"""Tensor parallelism end to end on CPU (gloo): greedy tokens of a mixed-adapter batch equal one
rank's and transformers + PEFT's; every rank's pool drains; a dead rank fails requests, no hang."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from slora_backend import Engine, EngineConfig, SamplingParams
from slora_backend.errors import EngineClosedError
from slora_backend.parallel import TensorParallelError
from tests.conftest import TOKENIZER_FILES, make_adapter
from tests.engine.peft_reference import PeftReference
from tests.engine.test_peft_equivalence import PROMPTS as EQUIVALENCE_PROMPTS

# Ranks 4-64 (6 is not divisible by 4 ranks: zero-padded rows of A), attention and MLP targets,
# one rsLoRA; plus base-model prompts.
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "r4-qv": dict(rank=4, targets=["q_proj", "v_proj"], alpha=8),
    "r6-all-rs": dict(rank=6, targets=ALL, alpha=12, rslora=True),
    "r32-mlp": dict(rank=32, targets=["gate_proj", "up_proj", "down_proj"], alpha=32),
    "r64-all": dict(rank=64, targets=ALL, alpha=64),
}
PROMPTS = EQUIVALENCE_PROMPTS[:6]
LORAS = ["r4-qv", "r6-all-rs", None, "r32-mlp", "r64-all", None]
MAX_TOKENS = 8
# (heads, KV heads, hidden, intermediate): MHA; GQA with KV heads split; GQA with each KV head
# replicated over two of four ranks.
SHAPES = {
    "mha": (4, 4, 64, 128),
    "gqa": (6, 2, 96, 160),
    "gqa-replicated": (4, 2, 64, 160),
}


def _make_model(out, shape, tokenizer_dir, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads, kv_heads, hidden, inter = SHAPES[shape]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=512, initializer_range=0.2,
                         bos_token_id=1, eos_token_id=2, hidden_size=hidden,
                         intermediate_size=inter, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, tie_word_embeddings=shape != "mha")
    LlamaForCausalLM(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2):
    root = tmp_path_factory.mktemp("tp-models")
    out = {}
    for i, shape in enumerate(SHAPES):
        model_dir = _make_model(root / shape, shape, smollm2, seed=i)
        adapters = {name: make_adapter(model_dir, root / f"{shape}-adapters" / name, seed=j, **kw)
                    for j, (name, kw) in enumerate(ADAPTERS.items())}
        out[shape] = (model_dir, root / f"{shape}-adapters", adapters)
    return out


@pytest.fixture(scope="module")
def tp_engines():
    """Tensor-parallel engines by shape, started once per module (each start spawns processes)."""
    engines: dict[str, Engine] = {}
    yield engines
    for engine in engines.values():
        engine.close()


def _engine(model_dir, adapter_root, tp: int) -> Engine:
    engine = Engine(EngineConfig(base_model=str(model_dir), adapter_root=str(adapter_root),
                                 kernel_backend="torch", pool_pages=512, tensor_parallel_size=tp))
    for name in ADAPTERS:
        if name not in engine.adapters.store:
            engine.load_adapter(name, name)
    return engine


def _greedy(engine: Engine) -> list[list[int]]:
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), LORAS)
    assert all(o.finish_reason == "length" for o in outs), [o.error for o in outs]
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("shape, tp", [("mha", 2), ("gqa", 2), ("gqa-replicated", 4)])
def test_tensor_parallel_matches_one_rank_and_peft(models, tp_engines, shape, tp):
    model_dir, adapter_root, adapters = models[shape]
    single = _engine(model_dir, adapter_root, 1)
    want = _greedy(single)
    engine = tp_engines[shape] = _engine(model_dir, adapter_root, tp)
    got = _greedy(engine)
    assert got == want
    ref = PeftReference(model_dir, adapters)
    for prompt, lora, tokens in zip(PROMPTS, LORAS, got):
        assert tokens == ref.greedy(engine.tokenizer.encode(prompt), lora, MAX_TOKENS), (prompt, lora)
    # Every rank's pool drained: no KV page held, the resident adapters' pages only, and
    # each worker's view of its pool is rank 0's.
    pool = engine.pool
    assert pool.used_by["kv"] == 0
    assert pool.num_free + pool.used_by["adapter"] == pool.num_pages
    reports = engine.tp.pool_reports()
    assert [r.rank for r in reports] == list(range(1, tp))
    for report in reports:
        assert (report.num_free, report.used_by) == (pool.num_free, dict(pool.used_by))
        assert report.resident_adapters == len(engine.adapters.cache)
    # Unloading an adapter frees its pages on every rank, and the rest still serves alike.
    engine.unload_adapter("r32-mlp")
    assert all(r.num_free == engine.pool.num_free for r in engine.tp.pool_reports())
    engine.load_adapter("r32-mlp", "r32-mlp")
    assert _greedy(engine) == want


def test_every_rank_sizes_its_pool_all_get_the_least_and_close_stops_the_workers(models, monkeypatch):
    from slora_backend.parallel import driver

    model_dir, _, _ = models["mha"]
    measured = driver.size_pool
    # Rank 0 (this process; the workers are spawned, unpatched) claims more room than it has:
    # every pool must get the worker's count, the least.
    monkeypatch.setattr(driver, "size_pool", lambda *args: measured(*args) + 1000)
    engine = Engine(EngineConfig(base_model=str(model_dir), kernel_backend="torch",
                                 cpu_pool_bytes=4 * 2**20, tensor_parallel_size=2))
    try:
        # A page: 16 tokens x (K, V) x 2 of the 4 KV heads x head_dim 16; 2 layers of fp32.
        assert engine.layout.page_size == 16 * 2 * 2 * 16
        assert engine.pool.num_pages == 4 * 2**20 // (2 * 1024 * 4)
        assert [r.num_free for r in engine.tp.pool_reports()] == [engine.pool.num_pages]
        out = engine.generate(PROMPTS[:2], SamplingParams(max_tokens=2, ignore_eos=True))
        assert [o.finish_reason for o in out] == ["length", "length"]
        workers = engine.tp.procs
    finally:
        engine.close()
    assert all(p.exitcode is not None for p in workers), "close() left a worker running"
    with pytest.raises(EngineClosedError):
        engine.add_request("more")


def test_a_pool_too_small_is_refused_and_no_worker_stays(models):
    model_dir, _, _ = models["mha"]
    before = set(multiprocessing.active_children())  # (the module's engines keep theirs)
    with pytest.raises(ValueError, match="cpu_pool_bytes 1000 holds 0 pages of 8192 bytes"):
        Engine(EngineConfig(base_model=str(model_dir), kernel_backend="torch",
                            cpu_pool_bytes=1000, tensor_parallel_size=2))
    assert set(multiprocessing.active_children()) <= before, "a worker outlived the failed start"


def test_a_killed_rank_fails_the_requests_and_the_engine_refuses_more(models, tp_engines):
    model_dir, adapter_root, _ = models["mha"]
    engine = tp_engines.get("mha") or _engine(model_dir, adapter_root, 2)
    tp_engines["mha"] = engine  # (reused from the equivalence test: its last use)
    finished: dict[str, object] = {}
    started = threading.Event()
    all_done = threading.Event()

    def collect(out):
        started.set()
        if out.finished:
            finished[out.request_id] = out
            if len(finished) == len(LORAS):
                all_done.set()

    engine.start()
    try:
        params = SamplingParams(max_tokens=400, ignore_eos=True)
        for prompt, lora in zip(PROMPTS, LORAS):
            engine.add_request(prompt, params, lora, on_output=collect)
        assert started.wait(60)
        worker = engine.tp.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert all_done.wait(30), "requests still running after a rank died"
        assert time.monotonic() - killed < 15
        for out in finished.values():
            assert out.finish_reason == "error"
            assert "tensor-parallel rank 1" in out.error and "signal 9" in out.error, out.error
        with pytest.raises(TensorParallelError, match="tensor-parallel rank 1 .* killed by signal 9"):
            engine.add_request("more", params)
    finally:
        engine.stop()


def test_workers_exit_with_the_engine_process(models, tmp_path):
    model_dir, adapter_root, _ = models["mha"]
    script = textwrap.dedent(f"""
        import sys, time
        from slora_backend import Engine, EngineConfig
        if __name__ == "__main__":
            engine = Engine(EngineConfig(base_model={str(model_dir)!r}, kernel_backend="torch",
                                         pool_pages=64, tensor_parallel_size=2))
            print(engine.tp.procs[0].pid, flush=True)
            time.sleep(600)
    """)
    (tmp_path / "engine_main.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "engine_main.py")], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _alive(worker_pid):
        time.sleep(0.2)
    assert not _alive(worker_pid), "the worker outlived its engine process"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # (a zombie has exited)
    except FileNotFoundError:
        return False
