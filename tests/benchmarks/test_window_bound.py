"""The window bound's replay, on the roofline tests' tiny shape where each step counts by hand."""

from __future__ import annotations

import pytest

from benchmarks import window_bound
from benchmarks.window_bound import StepModel, TimedRequest, replay
from tests.benchmarks.test_roofline import TINY

# Bytes only: at 1000 B/s and 1e12 FLOP/s a step takes (its bytes) ms.
MODEL = StepModel(TINY, bandwidth=1000.0, matmul_flops=1e12)
A = TimedRequest(0.0, prompt_len=3, output_len=2, adapter="a", rank=2)
B = TimedRequest(0.0, prompt_len=1, output_len=3, adapter="b", rank=4)


def test_steps_counted_by_hand():
    # step 1 admits both: weights of 2 rows 2928 + adapters 448 + 896, KV written 4 x 32 -> 4.4 s
    # step 2 decodes both: 4272 + KV read (3 + 1) and written 2 -> 4.464 s; A is done (t 8.864)
    # step 3 decodes B: weights of 1 row 2912 + 896, KV (2 + 1) x 32 -> 3.904 s (t 12.768)
    assert replay([A, B], MODEL, time_limit=13.0) == {
        "req_s": 2 / 13.0, "out_tok_s": 5 / 13.0, "completed": 2, "steps": 3}
    assert replay([A, B], MODEL, time_limit=12.0)["completed"] == 1
    half = StepModel(TINY, 1000.0, 1e12, efficiency=0.5)  # every step twice as long
    assert replay([A, B], half, time_limit=17.0)["steps"] == 1
    assert replay([A, B], half, time_limit=17.8)["completed"] == 1


def test_admission_waits_for_room_and_arrivals():
    # one sequence at a time: B joins after A's two steps (3.456 + 3.488 s), then runs 3 steps
    one = replay([A, B], MODEL, time_limit=100.0, max_num_seqs=1)
    assert one["completed"] == 2 and one["steps"] == 5
    # a prompt past the token budget waits: none fits, nothing runs
    assert replay([A], MODEL, time_limit=100.0, max_batched_tokens=2)["steps"] == 0
    # a late arrival: the engine idles until it comes
    late = TimedRequest(50.0, 3, 2, None, None)
    assert replay([late], MODEL, time_limit=57.0)["completed"] == 1
    assert replay([late], MODEL, time_limit=53.0)["completed"] == 0


def test_cli_on_the_harness_trace(capsys):
    rows = window_bound.main(["--cases", "S1:5", "--duration", "3", "--time-limit", "3",
                              "--efficiency", "1,0.5"])
    full, half = rows
    assert full["req_s"] > half["req_s"] > 0 and full["out_tok_s"] > half["out_tok_s"]
    overlapped = window_bound.main(["--cases", "S1:5", "--duration", "3", "--time-limit", "3",
                                    "--overlap"])[0]
    assert overlapped["out_tok_s"] >= full["out_tok_s"]
    assert "| S1 | 5 | 0.50 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--efficiency"):
        window_bound.main(["--cases", "S1:5", "--efficiency", "0"])
