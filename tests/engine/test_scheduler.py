"""Scheduler, page pool and adapter cache invariants, in plain Python (no model)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from slora_backend.adapters.gpu_cache import AdapterCache
from slora_backend.config import SamplingParams
from slora_backend.layout import PoolLayout
from slora_backend.model_loader import random_config
from slora_backend.model_spec import ModelSpec
from slora_backend.page_pool import PagePool, PoolExhaustedError
from slora_backend.request import Request
from slora_backend.scheduler import Scheduler


class FakeStore:
    """Adapter sizes only: what the cache and scheduler look at."""

    def __init__(self, pages: dict[str, int]) -> None:
        self.pages = pages

    def get(self, name):
        return SimpleNamespace(plan=SimpleNamespace(num_pages=self.pages[name]))


def make(num_pages=20, adapters=None, block_tokens=4, max_seqs=8, budget=64):
    pool = PagePool(num_pages)
    cache = AdapterCache(pool, FakeStore(adapters or {}))
    return pool, cache, Scheduler(pool, cache, block_tokens, max_seqs, budget)


def req(i, prompt_len=6, adapter=None, max_tokens=8):
    return Request(f"r{i}", list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), adapter)


def run_step(sched, now=None):
    """Pretend the model ran: every scheduled request computes its tokens and samples one."""
    out = sched.schedule(now)
    for s in out.scheduled:
        sampled = s.samples
        s.request.num_computed_tokens += s.num_new_tokens
        if sampled:
            s.request.output_token_ids.append(0)
            if len(s.request.output_token_ids) >= s.request.params.max_tokens:
                sched.finish(s.request, "length")
    return out


def test_pool_allocate_free_and_double_free():
    pool = PagePool(4)
    pages = pool.allocate(3, "kv")
    assert pool.num_free == 1 and pool.used_by["kv"] == 3
    with pytest.raises(PoolExhaustedError):
        pool.allocate(2, "kv")
    pool.free(pages)
    assert pool.check_empty()
    with pytest.raises(KeyError):
        pool.free(pages[:1])


def test_pages_are_proportional_to_rank():
    layout = PoolLayout(ModelSpec.from_hf_config(random_config("llama-7b")))
    qkvo = ("q_proj", "k_proj", "v_proj", "o_proj")
    pages = {r: layout.plan_adapter({m: r for m in qkvo}).num_pages for r in (8, 16, 32, 64)}
    assert pages == {8: 2, 16: 4, 32: 8, 64: 16}
    plan = layout.plan_adapter({"q_proj": 8, "down_proj": 8, "gate_proj": 4})
    # Rows are in (page, offset) order, none straddles a page, and each page's rows tile
    # [0, page_fill[page]) without gaps: host rows in this order copy to pages slice by slice.
    assert [(r.page, r.offset) for r in plan.rows] == sorted((r.page, r.offset) for r in plan.rows)
    ends = [0] * plan.num_pages
    for row in plan.rows:
        assert row.offset == ends[row.page] and row.offset + row.length <= layout.page_size
        ends[row.page] += row.length
    assert tuple(ends) == plan.page_fill and plan.used_elements == sum(ends)
    assert len({r.page for r in plan.rows}) == plan.num_pages > 1


def test_continuous_batching_admits_between_steps_and_drains():
    pool, cache, sched = make()
    sched.add(req(0))
    run_step(sched)
    sched.add(req(1))
    out = run_step(sched)
    # r0 decodes one token while r1 prefills its whole prompt in the same step.
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("r0", 1), ("r1", 6)]
    while sched.has_work():
        run_step(sched)
    assert pool.check_empty()


def test_chunked_prefill_under_token_budget():
    pool, cache, sched = make(budget=4)
    r = req(0, prompt_len=10)
    sched.add(r)
    chunks = [run_step(sched).scheduled[0].num_new_tokens for _ in range(3)]
    assert chunks == [4, 4, 2]
    assert len(r.output_token_ids) == 1  # sampled only when the prompt was complete


def test_preemption_returns_pages_and_keeps_tokens():
    pool, cache, sched = make(num_pages=6)
    a, b = req(0, prompt_len=8, max_tokens=12), req(1, prompt_len=8, max_tokens=12)
    sched.add(a)
    sched.add(b)
    preempted = []
    while sched.has_work():
        preempted += run_step(sched).preempted
        assert pool.num_free + pool.used_by["kv"] == 6
    assert preempted and all(r.num_preemptions > 0 for r in preempted)
    assert len(a.output_token_ids) == 12 and len(b.output_token_ids) == 12
    assert pool.check_empty()


def test_adapter_admission_eviction_and_pins():
    pool, cache, sched = make(num_pages=10, adapters={"x": 4, "y": 4, "z": 4})
    sched.add(req(0, prompt_len=4, adapter="x", max_tokens=2))
    sched.add(req(1, prompt_len=4, adapter="y", max_tokens=2))
    run_step(sched)
    assert "x" in cache and "y" in cache and cache.get("x").pins == 1
    # z does not fit until x and y are unpinned; then the least recently used is evicted.
    sched.add(req(2, prompt_len=4, adapter="z", max_tokens=2))
    while sched.has_work():
        run_step(sched)
    assert "z" in cache and cache.evictions >= 1
    assert all(cache.get(n).pins == 0 for n in ("z",))
    assert pool.used_by["kv"] == 0
    assert pool.used_by["adapter"] == sum(len(cache.get(n).pages) for n in list(cache._resident))


def test_thousands_of_tiny_adapters_keep_exact_accounting():
    names = {f"a{i}": 1 + i % 3 for i in range(3000)}
    pool, cache, sched = make(num_pages=64, adapters=names, max_seqs=16)
    for i, name in enumerate(names):
        sched.add(req(i, prompt_len=3, adapter=name, max_tokens=2))
    steps = 0
    while sched.has_work():
        run_step(sched)
        steps += 1
        resident = sum(len(cache.get(n).pages) for n in list(cache._resident))
        assert pool.used_by["adapter"] == resident
        assert pool.num_free + pool.used_by["kv"] + pool.used_by["adapter"] == 64
    assert pool.used_by["kv"] == 0
    assert cache.loads == 3000 and cache.loads - cache.evictions == len(cache)


def test_requests_whose_adapter_is_not_read_yet_are_passed_over_not_waited_for():
    pool = PagePool(40)
    cache = AdapterCache(pool, FakeStore({"slow": 2, "fast": 2}))
    ready = {"fast"}
    sched = Scheduler(pool, cache, 4, 8, 64, adapter_ready=lambda name: name in ready)
    first, second, third = req(0, adapter="slow"), req(1, adapter="fast"), req(2)
    for r in (first, second, third):
        sched.add(r)
    out = run_step(sched)
    assert [s.request for s in out.scheduled] == [second, third]
    assert list(sched.waiting) == [first] and "slow" not in cache
    ready.add("slow")  # its read finished: admitted on the next step, ahead of later arrivals
    sched.add(req(3))
    out = run_step(sched)
    assert first in [s.request for s in out.scheduled] and list(sched.waiting) == []


def test_admission_waits_while_all_running_requests_decode():
    """admit_wait_steps=2: a queued request joins a decoding batch on the third decode step (not
    the first), joins at once when nothing runs, and joins with a step that prefills anyway."""
    pool = PagePool(40)
    sched = Scheduler(pool, AdapterCache(pool, FakeStore({})), 4, 8, 64, admit_wait_steps=2)
    sched.add(req(0, max_tokens=20))
    assert [s.request.request_id for s in run_step(sched).scheduled] == ["r0"]  # nothing ran
    sched.add(req(1, max_tokens=20))
    assert [s.request.request_id for s in run_step(sched).scheduled] == ["r0"]  # waits
    assert [s.request.request_id for s in run_step(sched).scheduled] == ["r0"]  # waits
    joined = run_step(sched)
    assert [s.request.request_id for s in joined.scheduled] == ["r0", "r1"]
    assert joined.scheduled[1].num_new_tokens == 6  # its whole prompt
    # A step that already prefills (r2's second chunk) admits r3 without waiting.
    sched.max_batched_tokens = 4
    sched.add(req(2, prompt_len=10, max_tokens=20))
    for _ in range(2):
        run_step(sched)  # the wait
    assert [s.request.request_id for s in run_step(sched).scheduled] == ["r0", "r1", "r2"]
    sched.max_batched_tokens = 64
    sched.add(req(3, max_tokens=20))
    ids = [s.request.request_id for s in run_step(sched).scheduled]
    assert ids == ["r0", "r1", "r2", "r3"]
    assert pool.used_by["kv"] > 0 and not sched.waiting


def test_admission_waits_only_while_the_batch_is_full():
    """wait_only_when_full, admit_wait_steps=2, max_num_seqs 2: with a free place, a queued
    request joins a decoding batch at once; once more requests queue than there are free places,
    they join on the third decode step (not the first), all that fit at once."""
    pool = PagePool(60)
    sched = Scheduler(pool, AdapterCache(pool, FakeStore({})), 4, 2, 64, admit_wait_steps=2,
                      wait_only_when_full=True)
    sched.add(req(0, max_tokens=20))
    assert [s.request.request_id for s in run_step(sched).scheduled] == ["r0"]  # nothing ran
    sched.add(req(1, max_tokens=2))
    joined = run_step(sched)  # one free place, one queued: not full, joins at once
    assert [(s.request.request_id, s.num_new_tokens) for s in joined.scheduled] == [("r0", 1), ("r1", 6)]
    sched.add(req(2, max_tokens=20))  # full (no free place): the first step that waits
    assert [s.request.request_id for s in run_step(sched).scheduled] == ["r0", "r1"]
    assert [r.request_id for r in sched.running] == ["r0"]  # r1 had its 2 tokens
    sched.add(req(3, max_tokens=20))  # two queued, one free place: still full
    assert [s.request.request_id for s in run_step(sched).scheduled] == ["r0"]  # waits
    joined = run_step(sched)
    assert [s.request.request_id for s in joined.scheduled] == ["r0", "r2"]  # the third step
    assert joined.scheduled[1].num_new_tokens == 6  # its whole prompt
    assert [r.request_id for r in sched.waiting] == ["r3"]


def test_a_step_kept_cheap_admits_without_waiting():
    """cheap_step_tokens=10 (steps that small replay piecewise graphs): with one request
    decoding, a queued 6-token prompt joins at once (1 + 6 <= 10); a 12-token prompt that would
    make the step costly waits admit_wait_steps as before, and is never split to fit."""
    pool = PagePool(40)
    sched = Scheduler(pool, AdapterCache(pool, FakeStore({})), 4, 8, 64, admit_wait_steps=2,
                      cheap_step_tokens=10)
    sched.add(req(0, max_tokens=20))
    run_step(sched)
    sched.add(req(1, max_tokens=20))
    step = run_step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in step.scheduled] == [("r0", 1), ("r1", 6)]
    sched.add(req(2, prompt_len=12, max_tokens=20))
    assert [s.request.request_id for s in run_step(sched).scheduled] == ["r0", "r1"]  # waits
    assert [s.request.request_id for s in run_step(sched).scheduled] == ["r0", "r1"]  # waits
    joined = run_step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in joined.scheduled][-1] == ("r2", 12)
    # two small prompts queued: only what keeps the step cheap joins (3 decode + 6 = 9), whole
    sched.add(req(3, max_tokens=20))
    sched.add(req(4, max_tokens=20))
    step = run_step(sched)
    assert [s.request.request_id for s in step.scheduled] == ["r0", "r1", "r2", "r3"]
    assert [r.request_id for r in sched.waiting] == ["r4"]


def test_an_overloaded_queue_admits_the_newest_first():
    """newest first after 1 s (adaptive LIFO), max_num_seqs 2, five requests queued 0.1 s
    apart: while the oldest has waited at most 1 s, first come, first served; past that the two
    places go to the newest, behind a preempted request; those left keep their order, and with
    early abort the ones past the SLO are dropped rather than served late."""
    def queue(**kw):
        pool = PagePool(60)
        sched = Scheduler(pool, AdapterCache(pool, FakeStore({})), 4, 2, 64, lifo_after_s=1.0,
                          **kw)
        for i in range(5):
            r = req(i, max_tokens=20)
            r.arrival_time = 100.0 + 0.1 * i
            sched.add(r)
        return sched

    def ids(out):
        return [s.request.request_id for s in out.scheduled]

    assert ids(run_step(queue(), now=100.9)) == ["r0", "r1"]  # waited 0.9 s: in order
    sched = queue()
    # adapters are prefetched in the order the queue will be admitted
    assert [r.request_id for r in sched.prefetch_order(now=100.9)][:2] == ["r0", "r1"]
    assert [r.request_id for r in sched.prefetch_order(now=101.5)][:2] == ["r4", "r3"]
    assert ids(run_step(sched, now=101.5)) == ["r4", "r3"]
    assert [r.request_id for r in sched.waiting] == ["r0", "r1", "r2"]

    sched = queue()
    resumed = req(9, max_tokens=20)
    resumed.num_preemptions, resumed.arrival_time = 1, 99.0
    sched.waiting.appendleft(resumed)  # where a preempted request rejoins
    assert ids(run_step(sched, now=101.5)) == ["r9", "r4"]

    sched = queue(slo_ttft_s=1.25)  # r0-r2 waited more than 1.25 s at 101.5
    out = run_step(sched, now=101.5)
    assert [r.request_id for r in out.dropped] == ["r0", "r1", "r2"]
    assert ids(out) == ["r4", "r3"] and not sched.waiting


def test_newest_first_needs_a_wait_of_zero_or_more():
    from slora_backend.config import EngineConfig

    with pytest.raises(ValueError, match="newest_first_after_s must be >= 0, got -1"):
        EngineConfig(base_model="random:tiny-gqa", newest_first_after_s=-1)
