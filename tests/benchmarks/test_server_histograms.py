"""Quantiles of a server's Prometheus histograms over a replay (the difference of two scrapes)."""

from __future__ import annotations

import pytest

from benchmarks.baselines.server_histograms import parse_buckets, quantile

_BEFORE = """# HELP slora_time_to_first_token_seconds x
# TYPE slora_time_to_first_token_seconds histogram
slora_time_to_first_token_seconds_bucket{model="slora_engine",version="1",le="0.1"} 2
slora_time_to_first_token_seconds_bucket{model="slora_engine",version="1",le="0.2"} 2
slora_time_to_first_token_seconds_bucket{model="slora_engine",version="1",le="0.5"} 2
slora_time_to_first_token_seconds_bucket{model="slora_engine",version="1",le="+Inf"} 2
slora_time_to_first_token_seconds_count{model="slora_engine",version="1"} 2
other_bucket{le="0.1"} 7
"""
# 10 more observations: 4 in (0, 0.1], 4 in (0.1, 0.2], 1 in (0.2, 0.5], 1 above 0.5
_AFTER = _BEFORE.replace('le="0.1"} 2', 'le="0.1"} 6').replace('le="0.2"} 2', 'le="0.2"} 10') \
    .replace('le="0.5"} 2', 'le="0.5"} 11').replace('le="+Inf"} 2', 'le="+Inf"} 12')
NAME = "slora_time_to_first_token_seconds"


def test_buckets_are_read_by_bound_and_name():
    assert parse_buckets(_AFTER, NAME) == {0.1: 6, 0.2: 10, 0.5: 11, float("inf"): 12}
    assert parse_buckets(_AFTER, "other") == {0.1: 7}
    assert parse_buckets(_AFTER, "missing") == {}


def test_label_sets_add_up():
    two = _AFTER + _AFTER.replace('model="slora_engine"', 'model="other"')
    assert parse_buckets(two, NAME)[0.2] == 20


def test_quantile_of_the_observations_between_two_scrapes():
    before, after = parse_buckets(_BEFORE, NAME), parse_buckets(_AFTER, NAME)
    # rank 5 of 10: the 1st of 4 in (0.1, 0.2] -> 0.1 + 0.1 * 1/4
    assert quantile(before, after, 0.5) == pytest.approx(0.125)
    assert quantile(before, after, 0.2) == pytest.approx(0.05)  # rank 2 of 4 in (0, 0.1]
    assert quantile(before, after, 0.9) == pytest.approx(0.5)  # rank 9: the one in (0.2, 0.5]
    assert quantile(before, after, 0.99) == pytest.approx(0.5)  # in +Inf: the last finite bound
    assert quantile(after, after, 0.5) is None  # nothing observed in between
