"""Per-request timings of one replay, and the figures the S-LoRA paper reports from them.

Times are ``time.perf_counter()`` seconds. A request's first-token latency runs from its
*scheduled* arrival (replay start + ``arrival_s``), so a late submitter counts against the system.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_SLO_S = 6.0  # the paper's first-token SLO


@dataclass
class RequestRecord:
    arrival: float  # scheduled arrival (absolute perf_counter time)
    output_len: int
    submitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    finish_reason: str | None = None  # "length" | "stop" | "abort" | "error" | "rejected" | None
    num_output_tokens: int = 0
    last_token: float | None = None
    # Inter-token latency: for each output event after the first, the time since the one before
    # over the tokens it brought (one per token in a stream of single tokens).
    itl: list[float] = field(default_factory=list)

    def advance(self, num_output_tokens: int, now: float) -> None:
        """Tokens arrived: the first-token time, the count and the inter-token gaps."""
        new = num_output_tokens - self.num_output_tokens
        if new <= 0:
            return
        if self.first_token is None:
            self.first_token = now
        elif self.last_token is not None:
            self.itl.append((now - self.last_token) / new)
        self.last_token = now
        self.num_output_tokens = num_output_tokens


class Recorder:
    """Thread-safe record of every request of a replay; ``wait`` returns when all have ended."""

    def __init__(self) -> None:
        self.records: dict[str, RequestRecord] = {}
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._open = 0
        self.last_event = time.perf_counter()  # submission, token or end: for stall detection
        self.stalled = False

    def submitted(self, request_id: str, arrival: float, output_len: int) -> None:
        with self._lock:
            self.last_event = time.perf_counter()
            self.records[request_id] = RequestRecord(arrival, output_len, submitted=self.last_event)
            self._open += 1

    def rejected(self, request_id: str, reason: str = "rejected") -> None:
        with self._lock:
            rec = self.records[request_id]
            rec.finished, rec.finish_reason = time.perf_counter(), reason
            self._open -= 1
            self._done.notify_all()

    def token(self, request_id: str, num_output_tokens: int, now: float | None = None) -> None:
        now = now or time.perf_counter()
        with self._lock:
            self.last_event = max(self.last_event, now)
            rec = self.records.get(request_id)
            if rec is None:
                return
            rec.advance(num_output_tokens, now)

    def finish(self, request_id: str, reason: str, num_output_tokens: int | None = None,
               now: float | None = None) -> None:
        now = now or time.perf_counter()
        with self._lock:
            self.last_event = max(self.last_event, now)
            rec = self.records.get(request_id)
            if rec is None or rec.finished is not None:
                return
            if num_output_tokens is not None:
                rec.advance(num_output_tokens, now)
            rec.finished, rec.finish_reason = now, reason
            self._open -= 1
            self._done.notify_all()

    def open_ids(self) -> list[str]:
        with self._lock:
            return [i for i, r in self.records.items() if r.finished is None]

    def wait(self, deadline: float | None, idle_timeout_s: float | None = None) -> bool:
        """Block until every submitted request has ended (True), or ``deadline`` (perf_counter)
        passes, or nothing (no token, no end) happened for ``idle_timeout_s`` (False: a stalled
        system must not hang the benchmark)."""
        with self._done:
            while self._open > 0:
                now = time.perf_counter()
                if deadline is not None and now >= deadline:
                    return False
                if idle_timeout_s is not None and now - self.last_event >= idle_timeout_s:
                    self.stalled = True
                    return False
                wait = 1.0 if deadline is None else min(deadline - now, 1.0)
                self._done.wait(wait)
            return True


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def _pct_of_sent(ttft: list[float], sent: int, q: float) -> float | None:
    """The time within which ``q`` percent of the ``sent`` requests had their first token; a
    request that got none counts as never. None when fewer than q percent got one."""
    need = int(np.ceil(q / 100 * sent))
    if sent == 0 or need > len(ttft):
        return None
    return round(float(sorted(ttft)[max(need, 1) - 1]), 4)


def summarize(recorder: Recorder, *, planned: int, start: float, end: float,
              slo_s: float = DEFAULT_SLO_S) -> dict[str, Any]:
    """Throughput, first-token latency and SLO attainment of one replay.

    ``throughput_req_s`` counts requests that completed (all their tokens) over ``end - start``
    (the paper's definition). ``throughput_steady_req_s`` counts only completions in the last
    two thirds of the run, over that window: at a saturating rate it leaves out the ramp-up
    (the first completions need a whole output's worth of decode steps) and is the engine's
    capacity; on a run cut at a time limit there is no drain tail either.
    ``slo_attainment`` is the share of the ``planned`` requests whose first token came within
    ``slo_s`` of their arrival (requests never submitted, rejected or aborted count as misses).

    First-token latency is given two ways. ``ttft_p*_s`` are percentiles over the requests that
    got a first token (the usual figure, exact when every request is served). On a run cut at a
    time limit they leave out the requests still queued at the end, so a system that serves fewer
    requests is measured on fewer, earlier ones and looks faster. ``ttft_sent_p*_s`` are over every
    request sent, one that got no first token counting as never: the time within which that share
    of all requests was answered (None: fewer than that share got a first token at all).
    ``first_token_share`` is the share of sent requests that got one.

    Beside them, the figures vLLM's serving benchmark reports: TPOT (per completed request, its
    decode time over its tokens after the first), ITL (every gap between output events, per
    token) and end-to-end latency (per completed request, from its scheduled arrival), each as
    p50 / p99 (and TPOT's mean).
    """
    records = list(recorder.records.values())
    wall = max(end - start, 1e-9)
    completed = [r for r in records if r.finish_reason in ("length", "stop")]
    steady_from = start + wall / 3
    steady = sum(1 for r in completed if r.finished >= steady_from)
    ttft = [r.first_token - r.arrival for r in records if r.first_token is not None]
    e2e = [r.finished - r.arrival for r in completed]
    tpot = [(r.finished - r.first_token) / (r.num_output_tokens - 1)
            for r in completed if r.first_token is not None and r.num_output_tokens > 1]
    itl = [gap for r in records for gap in r.itl]
    out_tokens = sum(r.num_output_tokens for r in records)
    reasons: dict[str, int] = {}
    for r in records:
        key = r.finish_reason or "unfinished"
        reasons[key] = reasons.get(key, 0) + 1
    within = sum(1 for r in records if r.first_token is not None and r.first_token - r.arrival <= slo_s)
    lateness = [r.submitted - r.arrival for r in records if r.submitted is not None]
    return {
        "requests_planned": planned,
        "requests_submitted": len(records),
        "requests_completed": len(completed),
        "finish_reasons": reasons,
        "wall_s": round(wall, 3),
        "throughput_req_s": round(len(completed) / wall, 4),
        "throughput_steady_req_s": round(steady / (end - steady_from), 4),
        "throughput_out_tok_s": round(out_tokens / wall, 1),
        "output_tokens": out_tokens,
        "ttft_avg_s": round(float(np.mean(ttft)), 4) if ttft else None,
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p90_s": _pct(ttft, 90),
        "ttft_p99_s": _pct(ttft, 99),
        "first_token_share": round(len(ttft) / len(records), 4) if records else None,
        "ttft_sent_p50_s": _pct_of_sent(ttft, len(records), 50),
        "ttft_sent_p90_s": _pct_of_sent(ttft, len(records), 90),
        "latency_avg_s": round(float(np.mean(e2e)), 4) if e2e else None,
        "latency_p50_s": _pct(e2e, 50),
        "latency_p99_s": _pct(e2e, 99),
        "tpot_avg_s": round(float(np.mean(tpot)), 5) if tpot else None,
        "tpot_p50_s": _pct(tpot, 50),
        "tpot_p99_s": _pct(tpot, 99),
        "itl_p50_s": _pct(itl, 50),
        "itl_p99_s": _pct(itl, 99),
        "slo_s": slo_s,
        "slo_attainment": round(within / planned, 4) if planned else None,
        # how late the replay handed requests over (add_request may block on the engine)
        "submit_lateness_p99_s": _pct(lateness, 99),
        "submit_lateness_max_s": round(max(lateness), 4) if lateness else None,
    }


@dataclass
class OccupancySampler:
    """Pool occupancy sampled from ``engine.stats()`` at most every ``interval_s``.

    Call ``maybe_sample`` from the engine thread (an output callback), where the engine's
    counters are consistent.
    """

    engine: Any
    interval_s: float = 0.25
    samples: list[dict[str, int]] = field(default_factory=list)
    _last: float = 0.0

    def maybe_sample(self, now: float) -> None:
        if now - self._last >= self.interval_s:
            self._last = now
            self.samples.append(self.engine.stats().to_dict())

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"pool_samples": 0}
        total = self.samples[0]["pool_pages_total"]
        used = [total - s["pool_pages_free"] for s in self.samples]
        kv = [s["pool_pages_kv"] for s in self.samples]
        ad = [s["pool_pages_adapter"] for s in self.samples]
        running = [s["num_running"] for s in self.samples]
        waiting = [s["num_waiting"] for s in self.samples]
        return {
            "pool_samples": len(self.samples),
            "pool_pages_total": total,
            "pool_occupancy_avg": round(float(np.mean(used)) / total, 4),
            "pool_occupancy_max": round(max(used) / total, 4),
            "pool_kv_pages_avg": round(float(np.mean(kv)), 1),
            "pool_adapter_pages_avg": round(float(np.mean(ad)), 1),
            "pool_adapter_pages_max": max(ad),
            "running_avg": round(float(np.mean(running)), 1),
            "running_max": max(running),
            # > 0 through the run: the offered rate saturated the engine
            "waiting_avg": round(float(np.mean(waiting)), 1),
        }


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Engine counters over a replay; gauges (pool, registered) are taken from ``after``."""
    counters = ("adapter_loads", "adapter_evictions", "adapter_hits", "adapter_misses",
                "adapter_prefetches", "generated_tokens", "finished_requests", "preemptions",
                "steps", "decode_graphs", "graph_steps", "piecewise_graphs", "piecewise_steps")
    out: dict[str, Any] = {k: after[k] - before.get(k, 0) for k in counters if k in after}
    if {"steps", "graph_steps", "piecewise_steps"} <= out.keys():
        out["eager_steps"] = out["steps"] - out["graph_steps"] - out["piecewise_steps"]
    for k in after:  # the engine thread's, the device's and the adapter copies' seconds
        if k.startswith(("step_seconds_", "device_seconds_", "device_idle_", "adapter_copy_")):
            out[k] = round(after[k] - before.get(k, 0.0), 3)
    for k in ("adapters_registered", "adapters_gpu", "adapters_host", "adapter_partition_pages"):
        if k in after:
            out[k] = after[k]
    hits, misses = out.get("adapter_hits", 0), out.get("adapter_misses", 0)
    out["adapter_hit_ratio"] = round(hits / (hits + misses), 4) if hits + misses else None
    return out


TABLE_COLUMNS = [
    ("setting", "setting"), ("n", "n"), ("alpha", "alpha"), ("R", "rate"), ("cv", "cv"),
    ("system", "system"), ("req/s", "throughput_req_s"),
    ("steady req/s", "throughput_steady_req_s"), ("out tok/s", "throughput_out_tok_s"),
    ("TTFT avg s", "ttft_avg_s"), ("p50", "ttft_p50_s"), ("p90", "ttft_p90_s"),
    ("p99", "ttft_p99_s"), ("got 1st token", "first_token_share"),
    ("TTFT p50 (all sent)", "ttft_sent_p50_s"), ("p90 (all sent)", "ttft_sent_p90_s"),
    ("SLO att.", "slo_attainment"), ("hit ratio", "adapter_hit_ratio"),
    ("queue avg", "waiting_avg"), ("pool occ. avg", "pool_occupancy_avg"),
    ("GPU mem GiB", "gpu_max_allocated_gib"),
    ("done/planned", "done_planned"), ("note", "note"),
]


def markdown_header() -> str:
    names = [c for c, _ in TABLE_COLUMNS]
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(names)


def markdown_row(row: dict[str, Any]) -> str:
    row = dict(row)
    row["done_planned"] = f"{row.get('requests_completed', '-')}/{row.get('requests_planned', '-')}"
    cells = []
    for _, key in TABLE_COLUMNS:
        v = row.get(key)
        if v is None and key.startswith("ttft_sent_") and row.get("first_token_share") is not None:
            cells.append("not reached")  # (fewer than that share of the requests got a token)
        elif v is None:
            cells.append("-")
        elif isinstance(v, float):
            cells.append(f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}")
        else:
            cells.append(str(v).replace("|", "/"))
    return "| " + " | ".join(cells) + " |"
