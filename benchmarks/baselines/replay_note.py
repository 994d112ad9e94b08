"""How a trace replay ended: its figures, whether it was cut, and the note that says why.

Shared by every trace replay (this engine, Triton, vLLM). Nothing of the engine or torch: the
vLLM replay imports it inside vLLM's own Python process.
"""

from __future__ import annotations

from typing import Any

from ..metrics import Recorder, summarize


def replay_summary(recorder: Recorder, *, requests_in_trace: int, start: float, end: float,
                   truncated: bool, slo_s: float, time_limit_s: float | None,
                   idle_timeout_s: float, silence: str, open_requests: str) -> dict[str, Any]:
    """``summarize``'s figures over the requests sent (a replay cut at its time limit is judged
    on those), the trace's size, whether the replay was cut short, and ``replay_note``'s note."""
    sent = len(recorder.records)
    out: dict[str, Any] = {
        **summarize(recorder, planned=sent, start=start, end=end, slo_s=slo_s),
        "requests_in_trace": requests_in_trace,
        "truncated": truncated or sent < requests_in_trace,
    }
    note = replay_note(stalled=recorder.stalled, truncated=out["truncated"], sent=sent,
                       planned=requests_in_trace, time_limit_s=time_limit_s,
                       idle_timeout_s=idle_timeout_s, silence=silence, open_requests=open_requests)
    if note is not None:
        out["note"] = note
    return out


def limit_note(time_limit_s: float, sent: int, planned: int) -> str:
    """A replay cut at its time limit: how many of the trace's requests were sent before it."""
    return f"stopped at the {time_limit_s:g} s limit: {sent} of {planned} requests sent"


def replay_note(*, stalled: bool, truncated: bool, sent: int, planned: int, time_limit_s: float | None,
                idle_timeout_s: float, silence: str, open_requests: str) -> str | None:
    """The note of a replay that stopped early, or None when it ran to the end.

    A stall (no ``silence`` - "output", "response" - for ``idle_timeout_s``; the open requests
    ended as ``open_requests`` says) is named first: it explains a truncation too. Otherwise a
    truncated replay stopped at ``time_limit_s`` after sending ``sent`` of ``planned`` requests.
    """
    if stalled:
        return f"STALLED: no {silence} for {idle_timeout_s:g} s; open requests {open_requests}"
    if truncated:
        if time_limit_s is None:
            raise ValueError(f"a truncated replay that did not stall needs its time limit; "
                             f"got time_limit_s=None ({sent} of {planned} requests sent)")
        return limit_note(time_limit_s, sent, planned)
    return None
