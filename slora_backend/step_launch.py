"""One step launched on the device: the forward over the scheduled batch and the sampling.

A failed attempt is retried in halves (``step_retry``): a request whose own attempt still fails
ends with the error, its batch-mates go on. A failed attempt needs no undoing: it wrote only its
requests' own KV slots (written again by the retry), and the requests' progress
(``num_computed_tokens``) moves only once their part has run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .adapters.gpu_cache import AdapterCache
from .model_runner import ModelRunner, PendingTokens
from .sampler import Sampler
from .scheduler import ScheduledRequest
from .step_clock import StepClock, graph_replays, step_kind
from .step_in_flight import StepInFlight
from .step_retry import run_split_on_failure

logger = logging.getLogger(__name__)


@dataclass
class Launched:
    """What a launch left: the step the device runs (None when no part ran) and the requests
    that failed, each with its error."""

    in_flight: StepInFlight | None
    failed: list[tuple[ScheduledRequest, BaseException]]


class StepLauncher:
    """Runs the forward and samples on the device; the tokens are read by the next step."""

    def __init__(self, runner: ModelRunner, sampler: Sampler, cache: AdapterCache,
                 device: torch.device, clock: StepClock | None = None) -> None:
        self.runner = runner
        self.clock = clock or StepClock()  # charged with each launch's host time, by kind
        self.sampler = sampler
        self.cache = cache
        self.device = device

    def launch(self, scheduled: list[ScheduledRequest], pending: PendingTokens | None) -> Launched:
        """Launch ``scheduled`` (``pending``: the tokens of the step in flight, read on the device)."""
        before, start = graph_replays(self.runner), time.perf_counter()
        started = None
        if self.device.type == "cuda":  # (the device's span of the step, step_clock.DeviceClock)
            started = torch.cuda.Event(enable_timing=True)
            started.record()
        ran = run_split_on_failure(scheduled, lambda part: self._forward(part, pending), self._recover)
        kind = step_kind(before, graph_replays(self.runner))
        self.clock.add(kind, time.perf_counter() - start)
        if not ran.done:
            return Launched(None, ran.failed)
        sampling, tokens = [], []
        for part, part_tokens in ran.done:
            sampling += [s.request for s in part if s.samples]
            tokens.append(part_tokens)
            for s in part:
                s.request.num_computed_tokens += s.num_new_tokens
        return Launched(StepInFlight(sampling, tokens[0] if len(tokens) == 1 else torch.cat(tokens),
                                     kind, started), ran.failed)

    def _forward(self, scheduled: list[ScheduledRequest], pending: PendingTokens | None) -> torch.Tensor:
        """One attempt: the forward over ``scheduled`` and the tokens of those that sample."""
        residents = {r.adapter: self.cache.get(r.adapter)
                     for r in (s.request for s in scheduled) if r.adapter is not None}
        sampling = [s.request for s in scheduled if s.samples]
        logits = self.runner.execute(scheduled, residents, pending)
        return self.sampler.sample_on_device(
            logits, [r.request_id for r in sampling], [r.params for r in sampling])

    def _recover(self, error: BaseException) -> None:
        """After a failed attempt: let what it launched end (it may still write pages that its
        requests free if they fail), and give cached blocks back after running out of memory."""
        logger.warning("engine step failed, retrying smaller: %s", error)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            if isinstance(error, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
