"""Pool sizing (vLLM's rule: a share of the device's total memory, less weights, peak step,
graphs and per-page tables) as arithmetic; ``Engine.close`` and the context manager on CPU."""

from __future__ import annotations

import threading

import pytest

from slora_backend import Engine, EngineConfig, SamplingParams
from slora_backend.errors import EngineClosedError
from slora_backend.memory import (
    GIB,
    cpu_pool_pages,
    graph_bytes,
    plan_pool,
    slot_table_bytes_per_page,
)
from tests.conftest import make_adapter


def _plan(**changes):
    args = dict(total_bytes=100 * GIB, used_by_others=10 * GIB, fraction=0.5,
                weights_bytes=10 * GIB, peak_step_bytes=2 * GIB, page_bytes=1 << 20,
                table_bytes_per_page=0, graph_bytes=3 * GIB, other_bytes=1 * GIB, min_pages=16)
    args.update(changes)
    return plan_pool(**args)


def test_pool_gets_the_share_less_everything_else():
    plan = _plan()
    assert plan.share_bytes == 50 * GIB
    assert plan.pages == (50 - 10 - 2 - 3 - 1) * 1024  # MiB pages
    # every per-page table is paid for by the pages it indexes
    assert _plan(table_bytes_per_page=1 << 20).pages == plan.pages // 2


def test_the_share_counts_no_one_elses_memory():
    """Two engines at 0.45: the second's pool is as large as the first's although the first
    holds 45% of the device (its share is of the total, not of what is free)."""
    first = _plan(used_by_others=0, fraction=0.45)
    second = _plan(used_by_others=45 * GIB, fraction=0.45)
    assert first.pages == second.pages > 0


def test_a_share_that_is_not_free_is_refused_with_the_numbers():
    with pytest.raises(ValueError) as e:
        _plan(used_by_others=60 * GIB, fraction=0.45)
    assert ("gpu_memory_utilization 0.45 asks for 45.00 GiB of the device's 100.00 GiB, but only "
            "40.00 GiB are free") in str(e.value)


def test_a_pool_below_one_full_context_request_is_refused():
    with pytest.raises(ValueError) as e:
        _plan(weights_bytes=44 * GIB, min_pages=16)
    assert "but one request of the full context needs 16 pages" in str(e.value)
    assert "weights 44.00 GiB" in str(e.value) and "0 pages" in str(e.value)
    with pytest.raises(ValueError, match="cpu_pool_bytes 1000 holds 0 pages of 4096 bytes"):
        cpu_pool_pages(1000, 4096, 1)
    assert cpu_pool_pages(10 * 4096, 4096, 10) == 10


def test_table_and_graph_estimates():
    # ranks int32[7] + scaling + A/B^T offsets int64 [7, 256] + the half-width copy while widening
    assert slot_table_bytes_per_page(256) == 7 * 4 + 4 + 2 * 7 * 256 * 8 + 7 * 256 * 8
    assert slot_table_bytes_per_page(8) == 7 * 4 + 4 + 2 * 7 * 8 * 8
    small = graph_bytes(max_batch=1, vocab_size=1000, max_model_len=16, block_tokens=16,
                        peak_step_bytes=0)
    assert small == 13 * (1000 * 4 + 4 + 64)
    assert graph_bytes(max_batch=256, vocab_size=1000, max_model_len=16, block_tokens=16,
                       peak_step_bytes=5) == 1255 * small + 5


def test_gpu_memory_utilization_is_validated():
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\], got 1.5"):
        EngineConfig(base_model="random:tiny-gqa", gpu_memory_utilization=1.5)


def test_close_refuses_new_work_and_is_idempotent():
    with Engine(EngineConfig(base_model="random:tiny-gqa", pool_pages=64)) as engine:
        out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3))[0]
        assert out.finish_reason == "length"
    for call in (lambda: engine.add_request([1, 2]), lambda: engine.generate([[1, 2]]),
                 engine.step, engine.start):
        with pytest.raises(EngineClosedError, match="the engine is closed"):
            call()
    engine.close()  # (again: nothing happens)
    assert not hasattr(engine, "runner") and not hasattr(engine, "model")


def test_a_closed_engine_refuses_adapter_changes_and_still_lists(tiny_models, tmp_path):
    """Loading, unloading and resolving change the registry (and registry.json): refused after
    close(), and the registry stays as it was; listing and describing read it on; an abort has
    nothing left to end and is ignored."""
    make_adapter(tiny_models["gqa"], tmp_path / "a8", 8, ["q_proj", "v_proj"], 16, seed=3)
    make_adapter(tiny_models["gqa"], tmp_path / "b8", 8, ["q_proj"], 16, seed=4)
    engine = Engine(EngineConfig(base_model=str(tiny_models["gqa"]), adapter_root=str(tmp_path),
                                 pool_pages=128, block_tokens=4))
    engine.load_adapter("a8", "a8")
    engine.close()
    for call in (lambda: engine.unload_adapter("a8"), lambda: engine.load_adapter("b8", "b8"),
                 lambda: engine.resolve_adapter("b8"), engine.stats):
        with pytest.raises(EngineClosedError, match="the engine is closed"):
            call()
    assert [info.name for info in engine.list_adapters()] == ["a8"]
    assert engine.describe_adapter("a8").name == "a8"
    engine.abort("req-0")
    engine.close()


def test_close_ends_open_requests_of_a_running_loop():
    engine = Engine(EngineConfig(base_model="random:tiny-gqa", pool_pages=64))
    engine.start()
    ended = threading.Event()
    finals = []

    def on_output(out):
        if out.finished:
            finals.append(out)
            ended.set()

    engine.add_request([5, 6, 7], SamplingParams(max_tokens=900, ignore_eos=True), on_output=on_output)
    engine.close()
    assert ended.wait(5) and finals[0].finish_reason in ("abort", "length")
    assert engine.pool.check_empty()


def test_cublas_workspaces_go_only_when_the_last_engine_closes(monkeypatch):
    """Another engine's CUDA graphs write into the workspaces they were captured with: they are
    cleared when no engine is left, and cached blocks are given back at every close."""
    import torch

    from slora_backend.memory import CudaTenants

    calls: list[str] = []
    monkeypatch.setattr(CudaTenants, "_open", {})
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: calls.append("workspaces"),
                        raising=False)
    first, second = torch.device("cuda", 0), torch.device("cuda", 1)
    CudaTenants.opened(first)
    CudaTenants.opened(first)
    CudaTenants.opened(second)
    CudaTenants.closed(first)
    CudaTenants.closed(second)
    assert calls == ["empty_cache", "empty_cache"]
    CudaTenants.closed(first)
    assert calls == ["empty_cache", "empty_cache", "workspaces", "empty_cache"]
