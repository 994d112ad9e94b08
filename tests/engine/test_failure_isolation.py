"""One request never harms another: bad sampling parameters are clamped or refused, a row with
non-finite logits ends only its own request, and a failed step is retried smaller (with the
right greedy tokens, every page back, the engine serving on)."""

from __future__ import annotations

import math

import pytest
import torch

from slora_backend import Engine, EngineConfig, InvalidRequestError, SamplingParams
from slora_backend.outputs import NON_FINITE_ERROR
from slora_backend.sampler import NON_FINITE, Sampler
from slora_backend.step_retry import max_failures, run_split_on_failure

PROMPTS = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18], [19, 20, 21], [22, 23]]
GREEDY = SamplingParams(max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(base_model="random:tiny-gqa"))  # the default sizing


@pytest.fixture(scope="module")
def reference(engine):
    return [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]


def _serves_clean(engine, reference):
    assert engine.pool.check_empty()
    assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == reference


def test_tiny_temperature_is_clamped_and_spares_its_batch_mate(engine):
    """The issue's case: temperature 1e-40 used to overflow the logits and fail both requests."""
    bad, good = engine.generate([[5, 6, 7], [8, 9, 10]], [
        SamplingParams(max_tokens=4, temperature=1e-40), SamplingParams(max_tokens=4)])
    alone = engine.generate([[8, 9, 10]], SamplingParams(max_tokens=4))[0]
    assert bad.finish_reason == good.finish_reason == "length"
    assert len(bad.token_ids) == 4 and good.token_ids == alone.token_ids


def test_temperature_floor_is_vllms():
    assert SamplingParams(temperature=1e-40).temperature == 0.01
    assert SamplingParams(temperature=0.005).temperature == 0.01
    assert SamplingParams(temperature=0.02).temperature == 0.02
    assert SamplingParams(temperature=0.0).greedy


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature="hot"), "temperature must be >= 0, got hot"),
    (dict(top_p=math.inf), "top_p must be in (0, 1], got inf"),
    (dict(top_k=1.5), "top_k must be an integer, got 1.5"),
    (dict(seed=-1), "seed must be an integer in [0, 2^64), got -1"),
    (dict(seed=0.5), "seed must be an integer in [0, 2^64), got 0.5"),
    (dict(max_tokens=True), "max_tokens must be an integer >= 1, got True"),
    (dict(ignore_eos="yes"), "ignore_eos must be true or false, got 'yes'"),
])
def test_bad_types_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert message in str(e.value)


def test_no_parameters_give_nan_probabilities():
    """Logits at fp32's extremes, at the lowest temperature, through top-k and top-p: every row
    samples a real token; a row whose logits are not finite gives NON_FINITE, alone."""
    vocab = 50
    logits = (torch.arange(vocab, dtype=torch.float64) * 1.2e37 - 3e38).float().repeat(6, 1)
    logits[1, 7] = 3.4e38
    logits[4, 3] = math.nan
    logits[5, 9] = math.inf
    params = [SamplingParams(temperature=1e-40), SamplingParams(temperature=0.01, top_p=0.5),
              SamplingParams(temperature=1e30), SamplingParams(temperature=0.01, top_k=3, top_p=1e-9),
              SamplingParams(temperature=1.0), SamplingParams()]
    tokens = Sampler(torch.device("cpu")).sample(logits, [f"r{i}" for i in range(6)], params)
    assert all(0 <= t < vocab for t in tokens[:4]) and tokens[1] == 7
    assert tokens[4] == tokens[5] == NON_FINITE


def test_a_row_with_non_finite_logits_ends_only_its_request(engine, reference, monkeypatch):
    execute = engine.runner.execute

    def overflowing(scheduled, residents, pending=None):
        logits = execute(scheduled, residents, pending).clone()
        rows = [s for s in scheduled if s.samples]
        for i, s in enumerate(rows):
            if s.request.prompt_token_ids == PROMPTS[2] and len(s.request.output_token_ids) == 2:
                logits[i, 0] = math.nan
        return logits

    monkeypatch.setattr(engine.runner, "execute", overflowing)
    outs = engine.generate(PROMPTS, GREEDY)
    assert outs[2].finish_reason == "error" and outs[2].error == NON_FINITE_ERROR
    assert outs[2].token_ids == reference[2][:2]
    for i, out in enumerate(outs):
        if i != 2:
            assert out.finish_reason == "length" and out.token_ids == reference[i]
    monkeypatch.undo()
    _serves_clean(engine, reference)


def _faulty(engine, monkeypatch, fails):
    """Make the runner raise whenever ``fails(scheduled)``; returns the attempt log."""
    execute = engine.runner.execute
    attempts = []

    def run(scheduled, residents, pending=None):
        attempts.append(len(scheduled))
        if fails(scheduled):
            raise RuntimeError("injected fault")
        return execute(scheduled, residents, pending)

    monkeypatch.setattr(engine.runner, "execute", run)
    return attempts


def test_a_step_that_fails_once_is_retried_and_nothing_is_lost(engine, reference, monkeypatch):
    fired = []
    attempts = _faulty(engine, monkeypatch, lambda s: not fired and not fired.append(1))
    outs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert all(o.finish_reason == "length" for o in outs)
    assert attempts[:3] == [6, 3, 3]  # the whole batch failed, its halves ran
    monkeypatch.undo()
    _serves_clean(engine, reference)


def test_batches_above_k_rows_are_split_until_they_run(engine, reference, monkeypatch):
    attempts = _faulty(engine, monkeypatch, lambda s: len(s) > 2)
    outs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert max(a for a in attempts if a <= 2) == 2
    monkeypatch.undo()
    _serves_clean(engine, reference)


def test_a_request_that_always_breaks_its_step_fails_alone(engine, reference, monkeypatch):
    _faulty(engine, monkeypatch, lambda s: any(x.request.prompt_token_ids == PROMPTS[3] for x in s))
    outs = engine.generate(PROMPTS, GREEDY)
    assert outs[3].finish_reason == "error" and "injected fault" in outs[3].error
    assert [o.token_ids for i, o in enumerate(outs) if i != 3] == reference[:3] + reference[4:]
    monkeypatch.undo()
    _serves_clean(engine, reference)


def test_a_step_that_always_fails_ends_its_requests_and_the_engine_serves_on(
        engine, reference, monkeypatch):
    attempts = _faulty(engine, monkeypatch, lambda s: True)
    outs = engine.generate(PROMPTS, GREEDY)
    assert all(o.finish_reason == "error" and "injected fault" in o.error for o in outs)
    assert len(attempts) <= max_failures(len(PROMPTS))
    monkeypatch.undo()
    _serves_clean(engine, reference)


def test_split_retry_is_bounded_and_isolates():
    recovered = []

    def run(part):
        if 13 in part:
            raise ValueError("bad item")
        return sum(part)

    result = run_split_on_failure(list(range(64)), run, recovered.append)
    assert [item for item, _ in result.failed] == [13]
    assert sorted(i for part, _ in result.done for i in part) == [i for i in range(64) if i != 13]
    assert result.failures == len(recovered) == 1 + 6 + 1  # each halving level, then one retry
    everything = run_split_on_failure(list(range(64)), lambda part: 1 / 0, lambda e: None)
    assert len(everything.failed) == 64 and everything.failures == max_failures(64)
