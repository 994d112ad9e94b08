"""First-token latency over the requests that got one, and over every request sent."""

from __future__ import annotations

import pytest

from benchmarks.metrics import Recorder, markdown_row, summarize


def _replay(first_token_delays: list[float | None]) -> Recorder:
    """Requests arriving at t = 0, 1, 2, ...; a delay of None: no first token by the end."""
    recorder = Recorder()
    for i, delay in enumerate(first_token_delays):
        recorder.submitted(str(i), arrival=float(i), output_len=4)
        if delay is not None:
            recorder.token(str(i), 1, now=float(i) + delay)
    return recorder


def test_served_percentiles_leave_out_the_unserved_and_sent_percentiles_count_them():
    # 4 of 10 requests answered quickly, 6 still queued at the time limit
    summary = summarize(_replay([0.1, 0.2, 0.3, 0.4] + [None] * 6), planned=10, start=0.0, end=15.0)
    assert summary["ttft_p50_s"] == 0.25  # over the 4 that got a token: looks fast
    assert summary["first_token_share"] == 0.4
    assert summary["ttft_sent_p50_s"] is None and summary["ttft_sent_p90_s"] is None
    row = markdown_row({**summary, "system": "x"})
    assert "not reached" in row


def test_sent_percentile_is_the_time_that_share_of_all_requests_was_answered_within():
    delays = [0.5, 0.1, 2.0, 0.3, 9.0, 0.2, 0.4, 1.0, 3.0, None]
    summary = summarize(_replay(delays), planned=10, start=0.0, end=20.0)
    assert summary["first_token_share"] == 0.9
    assert summary["ttft_sent_p50_s"] == 0.5  # the 5th fastest of 10
    assert summary["ttft_sent_p90_s"] == 9.0  # the 9th of 10: the last that was answered
    everyone = summarize(_replay([0.1 * (i + 1) for i in range(10)]), planned=10, start=0.0, end=20.0)
    assert everyone["ttft_sent_p90_s"] == 0.9


def test_tpot_itl_and_latency_percentiles_as_vllm_reports_them():
    recorder = Recorder()
    # request a: arrives at 0, tokens at 1.0, 1.1, 1.2 (one per event), ends with its 4th at 1.3
    recorder.submitted("a", arrival=0.0, output_len=4)
    for n, t in ((1, 1.0), (2, 1.1), (3, 1.2)):
        recorder.token("a", n, now=t)
    recorder.finish("a", "length", 4, now=1.3)
    # request b: arrives at 1, first token at 1.5, then two tokens in one event at 2.5 (0.5 per
    # token), then the count repeated (no new token: no gap) and the end with nothing new
    recorder.submitted("b", arrival=1.0, output_len=3)
    recorder.token("b", 1, now=1.5)
    recorder.token("b", 3, now=2.5)
    recorder.token("b", 3, now=2.7)
    recorder.finish("b", "length", 3, now=2.8)
    s = summarize(recorder, planned=2, start=0.0, end=3.0)
    assert sorted(recorder.records["a"].itl) == pytest.approx([0.1, 0.1, 0.1])
    assert recorder.records["b"].itl == pytest.approx([0.5])  # one event of 2 tokens: 1.0 s / 2
    assert s["itl_p50_s"] == pytest.approx(0.1) and s["itl_p99_s"] == pytest.approx(0.488)
    # TPOT: a (1.3 - 1.0) / 3 = 0.1, b (2.8 - 1.5) / 2 = 0.65 (its end came 0.3 s after its tokens)
    assert s["tpot_p50_s"] == pytest.approx(0.375) and s["tpot_avg_s"] == pytest.approx(0.375)
    # end-to-end from the scheduled arrival: a 1.3, b 1.8
    assert s["latency_p50_s"] == pytest.approx(1.55) and s["latency_p99_s"] == pytest.approx(1.795)
