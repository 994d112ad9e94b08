"""The harness's Triton replay against a real tritonserver (started by the harness itself):
text prompts tokenize to the trace's exact lengths, every request streams all its tokens, and
the in-process and through-Triton rows come from the same trace."""

from __future__ import annotations

import json

import pytest

from benchmarks import harness

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_replay_through_tritonserver(tmp_path):
    out = tmp_path / "r.json"
    harness.main([
        "--base-model", "random:tiny-gqa", "--device", "cpu", "--dtype", "float32",
        "--setting", "S2", "--n", "8", "--rate", "6", "--duration", "2",
        "--input-range", "8", "40", "--output-range", "2", "10", "--triton-serve",
        "--triton-stream-interval", "3", "--triton-ready-timeout", "240", "--cache", str(tmp_path / "cache"),
        "--triton-log", str(tmp_path / "server.log"), "--json", str(out)])
    data = json.loads(out.read_text())
    rows = {r["system"]: r for r in data["results"]}
    assert set(rows) == {"slora", "slora_triton"}
    t = rows["slora_triton"]
    assert t["stream_errors"] == 0 and t["prompt_len_mismatches"] == 0
    assert t["finish_reasons"] == {"length": 12}
    assert t["output_tokens"] == rows["slora"]["output_tokens"]  # every token, 3 per response
    assert t["stream_interval"] == 3
    assert t["ttft_p50_s"] is not None and t["throughput_req_s"] > 0
    assert "triton_over_in_process" in next(iter(data["comparisons"].values()))
    # The server's own account of the first token, off its histograms over the replay: each
    # request's server-side time to first token lies inside the client's.
    assert 0 < t["server_ttft_p50_s"] <= t["ttft_p90_s"] + 0.05
    assert 0 <= t["server_first_response_delay_p50_s"] < t["ttft_p90_s"]
