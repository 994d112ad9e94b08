"""First-token latency over the requests that got one, and over every request sent."""

from __future__ import annotations

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
