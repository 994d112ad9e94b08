"""The S-LoRA paper's synthetic workload: n adapters, skewed popularity, Gamma arrivals.

Semantics (as the paper's generator, ``benchmarks/trace.py`` of S-LoRA, with its draw order, so a
seed gives the same trace as the paper's generator with that seed):

- ``num_requests = int(rate * duration_s)``;
- adapter of request i: ``int(power(alpha) * n)`` - alpha = 1 is uniform over the n adapters,
  alpha < 1 skews toward low indices (P(index < k) = (k / n) ** alpha);
- prompt and output lengths uniform integers in ``[lo, hi)`` (default [8, 512));
- inter-arrival times Gamma with shape ``1 / cv**2`` and scale ``cv**2 / rate`` (mean 1 / rate,
  coefficient of variation cv; cv = 1 is Poisson); arrival i is the sum of the first i + 1 gaps;
- adapter ranks are given round robin from the setting's rank set (adapter i has
  ``ranks[i % len(ranks)]``), targets q/k/v/o.

Everything is deterministic given the config (``numpy.random.RandomState(seed)``). The lengths
and arrival times do not depend on n or alpha (the adapter draws come first and always take
``num_requests`` uniforms), so one trace's timing is shared by every n and alpha of a sweep.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Setting:
    """A model setting of the paper: base model shape and the rank set of its adapters."""

    name: str
    base_shape: str  # a key of slora_backend.model_loader.RANDOM_SHAPES
    ranks: tuple[int, ...]


SETTINGS: dict[str, Setting] = {
    "S1": Setting("S1", "llama-7b", (8,)),
    "S2": Setting("S2", "llama-7b", (64, 32, 16, 8)),
    "S4": Setting("S4", "llama-13b", (64, 32, 16)),
}


def get_setting(name: str) -> Setting:
    try:
        return SETTINGS[name]
    except KeyError:
        raise ValueError(f"setting must be one of {sorted(SETTINGS)}, got {name!r}") from None


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int


def adapter_name(setting: str, index: int, rank: int) -> str:
    """Name of adapter ``index`` of a setting; the same for every n (sets are nested prefixes)."""
    return f"{setting.lower()}-{index:05d}-r{rank}"


def adapter_specs(setting: str, n: int) -> tuple[AdapterSpec, ...]:
    ranks = get_setting(setting).ranks
    return tuple(AdapterSpec(adapter_name(setting, i, ranks[i % len(ranks)]), ranks[i % len(ranks)])
                 for i in range(n))


@dataclass(frozen=True)
class Request:
    """One request of a trace. ``adapter`` is an adapter name, or None for the base model."""

    arrival_s: float
    adapter: str | None
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class WorkloadConfig:
    """Parameters of one trace. Raises ValueError naming the field on bad values."""

    setting: str = "S1"
    num_adapters: int = 100
    alpha: float = 1.0
    rate: float = 10.0  # requests per second (mean)
    cv: float = 1.0
    duration_s: float = 60.0
    input_range: tuple[int, int] = (8, 512)  # [lo, hi)
    output_range: tuple[int, int] = (8, 512)
    seed: int = 42

    def __post_init__(self) -> None:
        get_setting(self.setting)
        object.__setattr__(self, "input_range", tuple(int(v) for v in self.input_range))
        object.__setattr__(self, "output_range", tuple(int(v) for v in self.output_range))
        if self.num_adapters < 1:
            raise ValueError(f"num_adapters must be >= 1, got {self.num_adapters}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        for name in ("rate", "cv", "duration_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("input_range", "output_range"):
            lo, hi = getattr(self, name)
            if not 1 <= lo < hi:
                raise ValueError(f"{name} must be [lo, hi) with 1 <= lo < hi, got {(lo, hi)}")
        if self.num_requests < 1:
            raise ValueError(
                f"rate * duration_s must be >= 1 request, got {self.rate} * {self.duration_s}"
            )

    @property
    def num_requests(self) -> int:
        return int(self.rate * self.duration_s)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_range"], d["output_range"] = list(self.input_range), list(self.output_range)
        d["num_requests"] = self.num_requests
        return d


@dataclass(frozen=True)
class Workload:
    config: WorkloadConfig
    adapters: tuple[AdapterSpec, ...]
    requests: tuple[Request, ...] = field(repr=False)

    def prefix(self, num_requests: int) -> Workload:
        """The first ``num_requests`` requests (same distribution, same arrival times)."""
        return replace(self, requests=self.requests[:num_requests])

    def within(self, seconds: float) -> Workload:
        """The requests that arrive in the first ``seconds``."""
        return replace(self, requests=tuple(r for r in self.requests if r.arrival_s < seconds))

    def without_adapters(self) -> Workload:
        """The same requests on the base model (baseline: the no-LoRA upper bound)."""
        return replace(self, requests=tuple(replace(r, adapter=None) for r in self.requests))

    def used_adapters(self) -> list[str]:
        return sorted({r.adapter for r in self.requests if r.adapter is not None})

    def summary(self) -> dict[str, Any]:
        """Measured properties of the trace (what a reader checks against the config)."""
        reqs = self.requests
        if not reqs:
            return {"num_requests": 0}
        arrivals = np.array([r.arrival_s for r in reqs])
        gaps = np.diff(np.concatenate([[0.0], arrivals]))
        prompt = np.array([r.prompt_len for r in reqs])
        output = np.array([r.output_len for r in reqs])
        return {
            "num_requests": len(reqs),
            "last_arrival_s": round(float(arrivals[-1]), 3),
            "offered_rate": round(len(reqs) / float(arrivals[-1]), 3) if arrivals[-1] > 0 else None,
            "gap_cv": round(float(gaps.std() / gaps.mean()), 3) if len(gaps) > 1 else None,
            "mean_prompt_len": round(float(prompt.mean()), 1),
            "mean_output_len": round(float(output.mean()), 1),
            "total_output_tokens": int(output.sum()),
            "distinct_adapters_used": len(self.used_adapters()),
        }

    def to_json(self) -> str:
        return json.dumps({
            "config": self.config.to_dict(),
            "adapters": [asdict(a) for a in self.adapters],
            "requests": [[r.arrival_s, r.adapter, r.prompt_len, r.output_len] for r in self.requests],
        })

    @classmethod
    def from_json(cls, text: str) -> Workload:
        d = json.loads(text)
        cfg = {k: v for k, v in d["config"].items() if k != "num_requests"}
        return cls(
            WorkloadConfig(**cfg),
            tuple(AdapterSpec(**a) for a in d["adapters"]),
            tuple(Request(float(t), a, int(p), int(o)) for t, a, p, o in d["requests"]),
        )


def generate(config: WorkloadConfig) -> Workload:
    """The trace of ``config`` (see the module docstring for the distributions)."""
    rng = np.random.RandomState(config.seed)
    total = config.num_requests
    n = config.num_adapters
    # int() truncates; power() can return 1.0 only with probability ~0, clip it to the last index.
    index = np.minimum((rng.power(config.alpha, total) * n).astype(np.int64), n - 1)
    prompt_lens = rng.randint(config.input_range[0], config.input_range[1], total)
    output_lens = rng.randint(config.output_range[0], config.output_range[1], total)
    shape = 1.0 / (config.cv * config.cv)
    scale = config.cv * config.cv / config.rate
    arrivals = np.cumsum(rng.gamma(shape, scale, total))
    adapters = adapter_specs(config.setting, n)
    requests = tuple(
        Request(float(arrivals[i]), adapters[index[i]].name, int(prompt_lens[i]), int(output_lens[i]))
        for i in range(total)
    )
    return Workload(config, adapters, requests)


def paced(
    requests: Sequence[Request], start: float, time_limit_s: float | None
) -> Iterator[tuple[int, Request, float]]:
    """Yield ``(index, request, arrival)`` at each request's arrival time (``start`` is a
    ``time.perf_counter()`` value); stops at the first arrival at or past ``time_limit_s``."""
    for i, req in enumerate(requests):
        if time_limit_s is not None and req.arrival_s >= time_limit_s:
            return
        arrival = start + req.arrival_s
        delay = arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield i, req, arrival
