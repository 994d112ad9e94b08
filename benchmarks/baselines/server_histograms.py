"""Quantiles of a tritonserver's Prometheus histograms over one replay.

The harness's Triton row times each request at the client. The server's own histograms
(``slora_backend/serving/metrics.py``) say where part of that time went: the engine model's
time to first token, and how long the first response then waited to be sent. A replay scrapes
the metrics endpoint before and after; the difference of the cumulative bucket counts is the
replay's histogram, and a quantile is read off it as Prometheus' ``histogram_quantile`` does
(linear within the bucket that holds it).
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterable

_BUCKET = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)_bucket\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$')
_LE = re.compile(r'(?:^|,)le="(?P<le>[^"]+)"')

Buckets = dict[float, float]  # upper bound -> cumulative count, summed over label sets


def parse_buckets(text: str, name: str) -> Buckets:
    """The cumulative bucket counts of histogram ``name`` in a Prometheus text exposition."""
    out: Buckets = {}
    for line in text.splitlines():
        m = _BUCKET.match(line.strip())
        if m is None or m["name"] != name:
            continue
        le = _LE.search(m["labels"])
        if le is None:
            continue
        bound = float("inf") if le["le"] == "+Inf" else float(le["le"])
        out[bound] = out.get(bound, 0.0) + float(m["value"])
    return out


def scrape(url: str, names: Iterable[str], timeout_s: float = 10.0) -> dict[str, Buckets]:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    return {name: parse_buckets(text, name) for name in names}


def quantile(before: Buckets, after: Buckets, q: float) -> float | None:
    """The ``q`` quantile of the observations made between two scrapes; None if there were
    none. Above the last finite bound, that bound is returned (as Prometheus does)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower
