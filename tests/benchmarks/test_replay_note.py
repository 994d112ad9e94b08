"""The note every trace replay writes when it stops before the end of its trace."""

from __future__ import annotations

import pytest

from benchmarks.baselines.replay_note import limit_note, replay_note


def _note(**changes):
    args = dict(stalled=False, truncated=True, sent=891, planned=1500, time_limit_s=15.0,
                idle_timeout_s=120.0, silence="output", open_requests="aborted")
    args.update(changes)
    return replay_note(**args)


def test_a_run_cut_at_its_limit_says_how_many_requests_were_sent():
    assert limit_note(15.0, 891, 1500) == "stopped at the 15 s limit: 891 of 1500 requests sent"
    assert _note() == "stopped at the 15 s limit: 891 of 1500 requests sent"
    assert _note(time_limit_s=2.5) == "stopped at the 2.5 s limit: 891 of 1500 requests sent"


def test_a_stall_is_named_before_the_limit():
    assert _note(stalled=True) == "STALLED: no output for 120 s; open requests aborted"
    assert (_note(stalled=True, silence="response", open_requests="cancelled", idle_timeout_s=30.0)
            == "STALLED: no response for 30 s; open requests cancelled")


def test_a_complete_run_has_no_note():
    assert _note(truncated=False) is None


def test_a_truncation_without_a_limit_is_refused_with_the_counts():
    with pytest.raises(ValueError, match=r"time_limit_s=None \(891 of 1500 requests sent\)"):
        _note(time_limit_s=None)
