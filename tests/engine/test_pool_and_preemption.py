"""Pages always come back; a pool too small for the load still finishes every request exactly."""

from __future__ import annotations

import pytest

from slora_backend import Engine, EngineConfig, SamplingParams
from tests.conftest import make_adapter

PROMPTS = [f"Request number {i} says" + " hello" * (i % 5) for i in range(12)]


@pytest.fixture(scope="module")
def adapter_root(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("pool-adapters")
    make_adapter(tiny_models["gqa"], root / "a8", 8, ["q_proj", "v_proj"], 16, seed=1)
    make_adapter(tiny_models["gqa"], root / "b32", 32, ["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "down_proj"], 32, seed=2)
    return root


def _engine(model_dir, root, pool_pages=None, **kw):
    return Engine(EngineConfig(base_model=str(model_dir), adapter_root=str(root),
                               pool_pages=pool_pages, block_tokens=4, **kw))


def _loras(n):
    return [["a8", "b32", None][i % 3] for i in range(n)]


def test_pool_is_empty_after_all_requests_finish(tiny_models, adapter_root):
    engine = _engine(tiny_models["gqa"], adapter_root)
    engine.generate(PROMPTS, SamplingParams(max_tokens=7, ignore_eos=True), _loras(len(PROMPTS)))
    assert engine.pool.used_by["kv"] == 0
    # Adapters stay resident (cached) but unpinned; evicting them empties the pool entirely.
    for name in list(engine.adapters.cache._resident):
        engine.adapters.cache.evict(name)
    assert engine.pool.check_empty()


def test_small_pool_preempts_and_gives_identical_tokens(tiny_models, adapter_root):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    big = _engine(tiny_models["gqa"], adapter_root).generate(PROMPTS, params, _loras(len(PROMPTS)))
    # The adapters take ~135 pages, a request up to 9: KV for a few requests at a time.
    small = _engine(tiny_models["gqa"], adapter_root, pool_pages=175)
    outs = small.generate(PROMPTS, params, _loras(len(PROMPTS)))
    stats = small.stats()
    assert stats.preemptions > 0, "the pool was meant to be too small for the whole load"
    assert [o.token_ids for o in outs] == [o.token_ids for o in big]
    assert all(len(o.token_ids) == 24 and o.finish_reason == "length" for o in outs)
    assert small.pool.used_by["kv"] == 0


def test_abort_frees_pages_and_others_finish(tiny_models, adapter_root):
    engine = _engine(tiny_models["gqa"], adapter_root)
    seen: dict[str, list] = {}
    ids = [engine.add_request(p, SamplingParams(max_tokens=30, ignore_eos=True), lora,
                              on_output=lambda o: seen.setdefault(o.request_id, []).append(o))
           for p, lora in zip(PROMPTS[:6], _loras(6))]
    for _ in range(3):
        engine.step()
    assert engine.pool.used_by["kv"] > 0
    engine.abort(ids[0])
    engine.abort(ids[3])
    while engine.scheduler.has_work() or engine._inbox or engine._aborts:
        engine.step()
    finals = {rid: outs[-1] for rid, outs in seen.items()}
    assert finals[ids[0]].finish_reason == "abort" and finals[ids[3]].finish_reason == "abort"
    assert all(finals[r].finish_reason == "length" for r in ids if r not in (ids[0], ids[3]))
    assert all(len(finals[r].token_ids) == 30 for r in ids if r not in (ids[0], ids[3]))
    assert engine.pool.used_by["kv"] == 0


def test_streaming_thread_and_abort(tiny_models, adapter_root):
    import threading

    engine = _engine(tiny_models["gqa"], adapter_root)
    engine.start()
    try:
        done = threading.Event()
        outs = []

        def on_output(o):
            outs.append(o)
            if len(outs) == 3:
                engine.abort(o.request_id)
            if o.finished:
                done.set()

        engine.add_request("Streaming test", SamplingParams(max_tokens=200, ignore_eos=True),
                           "a8", on_output=on_output)
        assert done.wait(60)
        assert outs[-1].finish_reason == "abort"
        assert 3 <= len(outs[-1].token_ids) < 200
        # Deltas add up to the final text.
        assert "".join(o.delta_text for o in outs) == outs[-1].text
        res = engine.generate(["After abort"], SamplingParams(max_tokens=4, ignore_eos=True))
        assert len(res[0].token_ids) == 4
    finally:
        engine.stop()
    assert engine.pool.used_by["kv"] == 0


def test_warm_up_leaves_no_trace(tiny_models, adapter_root):
    """The CUDA engine compiles its kernels at start by serving a few requests of its own (for
    the base and each registered rank): afterwards no page, request or count of theirs remains,
    and the engine answers as one that never warmed up."""
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    cold = _engine(tiny_models["gqa"], adapter_root).generate(PROMPTS[:4], params, _loras(4))
    engine = _engine(tiny_models["gqa"], adapter_root)  # restores a8 and b32 (the cold one used them)
    assert sorted(a.name for a in engine.list_adapters()) == ["a8", "b32"]
    engine._warm_up()
    stats = engine.stats()
    assert stats.pool_pages_kv == 0 and stats.num_running == stats.num_waiting == 0
    assert stats.steps == stats.generated_tokens == stats.finished_requests == 0
    assert stats.adapters_gpu == 2  # it did use both adapters, and they stay cached
    assert [a.total_requests for a in engine.list_adapters()] == [0, 0]
    warm = engine.generate(PROMPTS[:4], params, _loras(4))
    assert [o.token_ids for o in warm] == [o.token_ids for o in cold]
