"""The note a replay writes when it did not run to the end of its trace.

Shared by every trace replay (this engine, Triton, vLLM). Standard library only: the vLLM
replay imports it inside vLLM's own Python process.
"""

from __future__ import annotations


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
