"""A request's progress through the engine, and what the engine reports back for it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from .config import SamplingParams

PENDING = -1  # an output token still being sampled on the device (see Request)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # a request is equal only to itself: queues find and remove it by identity
class Request:
    """One generation request. Progress is counters over its tokens (prompt, then output).

    Invariants: ``num_computed_tokens <= num_tokens``; ``block_table`` holds exactly
    ``ceil(num_computed_tokens / block_tokens)`` pages or more (pages reserved for this step).
    The last ``num_pending_tokens`` entries of ``output_token_ids`` are placeholders
    (``PENDING``) for tokens a launched step is still sampling on the device: they count as
    tokens for scheduling (the next step is built while that one runs), and are filled in - or
    dropped, when the request ends - once the host reads them.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_preemptions: int = 0
    num_pending_tokens: int = 0

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``start:end`` of prompt + output, without joining the two lists."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def known_output_ids(self) -> list[int]:
        """The output tokens the host has read (pending placeholders left out)."""
        return self.output_token_ids[:len(self.output_token_ids) - self.num_pending_tokens]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass
class RequestOutput:
    """What one request has produced so far (or in total, once ``finished``)."""

    request_id: str
    token_ids: list[int]
    text: str
    delta_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    num_prompt_tokens: int
    error: str | None = None
