"""The S-LoRA workload generator: its distributions, checked statistically with fixed seeds.

Tolerances are several standard errors wide at these sample sizes, so a correct generator
passes with every seed, while a wrong shape/scale, a skew in the wrong direction or an
off-by-one in the length range fails.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from benchmarks.workload import SETTINGS, Workload, WorkloadConfig, adapter_specs, generate

BIG = dict(rate=10.0, duration_s=2000.0)  # 20000 requests


def _gaps(w: Workload) -> np.ndarray:
    arrivals = np.array([r.arrival_s for r in w.requests])
    return np.diff(np.concatenate([[0.0], arrivals]))


def test_deterministic_given_the_seed():
    cfg = WorkloadConfig(num_adapters=50, alpha=0.5, rate=5, duration_s=20, seed=7)
    assert generate(cfg) == generate(cfg)
    assert generate(cfg).requests != generate(dataclasses.replace(cfg, seed=8)).requests


def test_same_draws_as_the_papers_generator():
    """The paper's draw order with the global RandomState: power, randint x2, gamma."""
    cfg = WorkloadConfig(num_adapters=37, alpha=0.3, rate=4.0, cv=2.0, duration_s=50, seed=42)
    np.random.seed(42)
    total = int(4.0 * 50)
    index = (np.random.power(0.3, total) * 37).astype(int)
    prompt = np.random.randint(8, 512, total)
    output = np.random.randint(8, 512, total)
    arrivals = np.cumsum(np.random.gamma(1 / 4.0, 4.0 / 4.0, total))
    w = generate(cfg)
    names = [a.name for a in w.adapters]
    assert [r.adapter for r in w.requests] == [names[i] for i in index]
    assert [r.prompt_len for r in w.requests] == prompt.tolist()
    assert [r.output_len for r in w.requests] == output.tolist()
    np.testing.assert_allclose([r.arrival_s for r in w.requests], arrivals)


@pytest.mark.parametrize("rate", [2.0, 10.0, 50.0])
def test_mean_arrival_rate(rate):
    w = generate(WorkloadConfig(rate=rate, duration_s=20000 / rate, seed=1))
    assert len(w.requests) == 20000
    measured = len(w.requests) / w.requests[-1].arrival_s
    assert measured == pytest.approx(rate, rel=0.03)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_gap_coefficient_of_variation(cv):
    gaps = _gaps(generate(WorkloadConfig(cv=cv, seed=2, **BIG)))
    assert gaps.mean() == pytest.approx(1 / 10.0, rel=0.03 * max(cv, 1))
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.06)
    assert (gaps >= 0).all()  # bursty (cv > 1) gaps can be below float resolution


def test_arrivals_are_increasing_and_span_the_duration():
    w = generate(WorkloadConfig(rate=20, duration_s=100, seed=3))
    arrivals = [r.arrival_s for r in w.requests]
    assert arrivals == sorted(arrivals)
    assert arrivals[-1] == pytest.approx(100, rel=0.1)


@pytest.mark.parametrize("lo,hi", [(8, 512), (1, 4), (100, 200)])
def test_lengths_uniform_in_half_open_range(lo, hi):
    w = generate(WorkloadConfig(input_range=(lo, hi), output_range=(lo, hi), seed=4, **BIG))
    for attr in ("prompt_len", "output_len"):
        v = np.array([getattr(r, attr) for r in w.requests])
        assert v.min() == lo and v.max() == hi - 1  # hi is excluded, both ends are reached
        assert v.mean() == pytest.approx((lo + hi - 1) / 2, rel=0.02)
        counts = np.bincount(v - lo, minlength=hi - lo)
        expected = len(v) / (hi - lo)
        assert counts.max() < expected + 5 * np.sqrt(expected) + 1


@pytest.mark.parametrize("alpha", [1.0, 0.3, 0.1])
def test_popularity_cdf_is_power_law(alpha):
    """P(adapter index < k) = (k / n) ** alpha: uniform at 1, skewed to low indices below."""
    n = 100
    w = generate(WorkloadConfig(num_adapters=n, alpha=alpha, seed=5, **BIG))
    position = {a.name: i for i, a in enumerate(w.adapters)}
    index = np.array([position[r.adapter] for r in w.requests])
    assert index.min() >= 0 and index.max() < n
    for k in (1, 5, 10, 30, 60, 90):
        assert (index < k).mean() == pytest.approx((k / n) ** alpha, abs=0.015)


def test_low_alpha_concentrates_on_fewer_adapters():
    cfgs = [WorkloadConfig(num_adapters=1000, alpha=a, seed=6, **BIG) for a in (1.0, 0.3)]
    uniform, skewed = (generate(c) for c in cfgs)
    top = {}
    for name, w in (("uniform", uniform), ("skewed", skewed)):
        counts = np.sort(np.unique([r.adapter for r in w.requests], return_counts=True)[1])[::-1]
        top[name] = counts[:100].sum() / len(w.requests)  # share of the 100 busiest adapters
    assert top["uniform"] < 0.2  # 0.1 plus the luck of picking the busiest of 1000
    assert top["skewed"] == pytest.approx(0.1 ** 0.3, abs=0.03)
    short = [generate(dataclasses.replace(c, duration_s=100)) for c in cfgs]  # 1000 requests
    assert len(short[1].used_adapters()) < 0.8 * len(short[0].used_adapters())


def test_timing_and_lengths_do_not_depend_on_n_or_alpha():
    base = WorkloadConfig(num_adapters=5, alpha=1.0, rate=10, duration_s=30, seed=9)
    a = generate(base)
    b = generate(dataclasses.replace(base, num_adapters=2000, alpha=0.3))
    strip = lambda w: [(r.arrival_s, r.prompt_len, r.output_len) for r in w.requests]  # noqa: E731
    assert strip(a) == strip(b)
    assert [r.adapter for r in a.requests] != [r.adapter for r in b.requests]


def test_ranks_round_robin_and_nested_names():
    assert [a.rank for a in adapter_specs("S2", 9)] == [64, 32, 16, 8, 64, 32, 16, 8, 64]
    assert {a.rank for a in adapter_specs("S1", 50)} == {8}
    assert adapter_specs("S2", 1000)[:100] == adapter_specs("S2", 100)
    assert len({a.name for a in adapter_specs("S1", 2000)}) == 2000
    assert set(SETTINGS) >= {"S1", "S2"}


def test_number_of_requests_is_rate_times_duration():
    assert len(generate(WorkloadConfig(rate=7.5, duration_s=10)).requests) == 75


@pytest.mark.parametrize("field,value", [
    ("num_adapters", 0), ("alpha", 0.0), ("rate", -1.0), ("cv", 0.0), ("duration_s", 0.0),
    ("input_range", (8, 8)), ("output_range", (0, 5)), ("setting", "S9"),
])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field.split("_range")[0] if field != "setting" else "setting"):
        WorkloadConfig(**{field: value})


def test_json_round_trip_and_views():
    w = generate(WorkloadConfig(setting="S2", num_adapters=12, rate=5, duration_s=10, seed=11))
    assert Workload.from_json(w.to_json()) == w
    assert len(w.prefix(7).requests) == 7
    assert all(r.arrival_s < 3 for r in w.within(3).requests)
    assert all(r.adapter is None for r in w.without_adapters().requests)
    s = w.summary()
    assert s["num_requests"] == 50 and s["distinct_adapters_used"] <= 12


def test_adapter_set_prefix_counts_only_missing_adapters_against_the_disk():
    """A set already on disk fits a full disk; new adapters must fit the room left, the whole
    prefix the size cap."""
    from benchmarks.adapter_sets import adapter_bytes, fitting_prefix, model_spec

    spec = model_spec("random:llama-7b")
    specs = adapter_specs("S1", 10)
    one = adapter_bytes(spec, 8)
    assert fitting_prefix(specs, spec, 100 * one, 0, [True] * 10) == 10
    assert fitting_prefix(specs, spec, 100 * one, 2 * one, [True] * 5 + [False] * 5) == 7
    assert fitting_prefix(specs, spec, 4 * one, 100 * one, [False] * 10) == 4
