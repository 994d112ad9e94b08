"""Overload behaviour (early abort, bounded queue) and the paper's ablation modes."""

from __future__ import annotations

import pytest

from slora_backend import Engine, EngineConfig, SamplingParams
from slora_backend.errors import EngineOverloadedError
from tests.conftest import make_adapter

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def root(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation-adapters")
    make_adapter(tiny_models["gqa"], root / "a", 8, ["q_proj", "k_proj", "v_proj"], 16, seed=3)
    make_adapter(tiny_models["gqa"], root / "b", 16, ["gate_proj", "up_proj", "o_proj"], 8, seed=4)
    return root


def _engine(model, root, **kw):
    engine = Engine(EngineConfig(base_model=str(model), adapter_root=str(root), block_tokens=4, **kw))
    engine.resolve_adapter("a")  # registered from registry.json, or loaded on first use
    engine.resolve_adapter("b")
    return engine


PROMPTS = ["one two three", "four five", "six", "seven eight nine ten"]
LORAS = ["a", "b", None, "a"]


def test_ablations_give_the_same_tokens(tiny_models, root):
    reference = _engine(tiny_models["gqa"], root).generate(PROMPTS, PARAMS, LORAS)
    for kw in (dict(lora_ops="bmm"), dict(adapter_pool_pages=120), dict(prefetch_adapters=False)):
        engine = _engine(tiny_models["gqa"], root, **kw)
        outs = engine.generate(PROMPTS, PARAMS, LORAS)
        assert [o.token_ids for o in outs] == [o.token_ids for o in reference], kw
    stats = engine.stats()
    assert stats.pool_pages_kv == 0


def test_separate_adapter_partition_never_holds_kv(tiny_models, root):
    engine = _engine(tiny_models["gqa"], root, adapter_pool_pages=120, pool_pages=200)
    engine.generate(PROMPTS, PARAMS, LORAS)
    stats = engine.stats()
    assert stats.adapter_partition_pages == 120 and stats.pool_pages_total == 80
    assert engine.adapters.pool is not engine.pool
    assert all(p >= 80 for name in ("a", "b") for p in engine.adapters.cache.get(name).pages)


def test_bounded_queue_refuses_with_a_clear_error(tiny_models, root):
    engine = _engine(tiny_models["gqa"], root, max_waiting=2)
    engine.add_request("x", PARAMS)
    engine.add_request("y", PARAMS)
    with pytest.raises(EngineOverloadedError, match="2 requests are already waiting"):
        engine.add_request("z", PARAMS)
    while engine.scheduler.has_work() or engine._inbox:
        engine.step()
    engine.add_request("z", PARAMS)  # room again


def test_early_abort_drops_requests_past_the_slo(tiny_models, root):
    engine = _engine(tiny_models["gqa"], root, slo_ttft_s=5.0, early_abort=True, max_num_seqs=1)
    finals = {}
    ids = [engine.add_request(p, PARAMS, lora, on_output=lambda o: finals.__setitem__(o.request_id, o))
           for p, lora in zip(PROMPTS, LORAS)]
    engine._drain_inbox()
    for r in list(engine.scheduler.waiting)[2:]:
        r.arrival_time -= 10.0  # these two have already waited past the SLO
    while engine.scheduler.has_work():
        engine.step()
    assert [finals[i].finish_reason for i in ids] == ["length", "length", "abort", "abort"]
    assert "first-token SLO" in finals[ids[2]].error
    assert engine.pool.used_by["kv"] == 0
