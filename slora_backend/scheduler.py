"""Iteration-level continuous batching over the unified pool. Plain Python, no tensors.

Each step says "compute n tokens for request r": n = 1 for a decoding request, up to the whole
remaining prompt for a prefilling one (chunked when the token budget runs out). Running requests
go first, oldest first; waiting requests join while the pool has room for their KV pages and,
if their adapter is not resident, its pages. When a running request needs a page and none can
be freed (even by evicting idle adapters), the newest running request is preempted by
recomputation: its pages go back, it keeps its generated tokens and rejoins the queue's front.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice

from .adapters.gpu_cache import AdapterCache
from .page_pool import KV, PagePool
from .request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the request's tokens (so it samples one more)."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    dropped: list[Request] = field(default_factory=list)  # early abort: SLO already missed

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        pool: PagePool,
        adapters: AdapterCache,
        block_tokens: int,
        max_num_seqs: int,
        max_batched_tokens: int,
        slo_ttft_s: float | None = None,
        adapter_ready: Callable[[str], bool] = lambda name: True,
        admit_wait_steps: int = 0,
        cheap_step_tokens: int = 0,
        wait_only_when_full: bool = False,
        lifo_after_s: float | None = None,
    ) -> None:
        self.pool = pool
        # While every running request decodes, new requests join only every admit_wait_steps+1
        # steps: a step that prefills cannot replay a decode CUDA graph and costs several decode
        # steps of host time, whether it admits one request or ten (LightLLM's router waits
        # the same way, router_max_wait_tokens).
        self.admit_wait_steps = admit_wait_steps
        # ... unless the step that admits stays within cheap_step_tokens tokens: such a step
        # replays piecewise CUDA graphs (``PiecewiseGraphs``) and costs about a decode step, so
        # queued requests whose whole prompts fit join at once (0: no step is cheap).
        self.cheap_step_tokens = cheap_step_tokens
        # ... and, with wait_only_when_full, only while more requests queue than the batch has
        # free places: while it has room for them all, waiting only delays their first tokens.
        self.wait_only_when_full = wait_only_when_full
        # Adaptive LIFO ("Fail at Scale", Facebook's RPC queues): once the oldest new request
        # has queued this long, the queue no longer drains and first come, first served only
        # makes every request late; newest first then keeps most first tokens early and leaves
        # the wait to those already late (with early abort, they are dropped at the SLO).
        self.lifo_after_s = lifo_after_s
        self._steps_without_admission = 0
        self.adapter_ready = adapter_ready
        self.adapters = adapters
        # Adapters either share this pool with KV (S-LoRA's unified paging) or have their own.
        self.unified = adapters.pool is pool
        self.slo_ttft_s = slo_ttft_s
        self.block_tokens = block_tokens
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_tokens)

    def _grow(self, request: Request, num_new_tokens: int) -> bool:
        """Give ``request`` the KV pages for ``num_new_tokens`` more tokens, evicting idle adapters."""
        need = self._pages_for(request.num_computed_tokens + num_new_tokens) - len(request.block_table)
        if need <= 0:
            return True
        if need > self.pool.num_free and not (self.unified and self.adapters.make_room(need)):
            return False
        request.block_table += self.pool.allocate(need, KV)
        return True

    def _fits(self, request: Request, kv_pages: int) -> bool:
        adapter_pages = self.adapters.pages_to_admit(request.adapter)
        if self.unified:
            return self.pool.num_free + self.adapters.evictable_pages() >= kv_pages + adapter_pages
        adapter_room = self.adapters.pool.num_free + self.adapters.evictable_pages()
        return self.pool.num_free >= kv_pages and adapter_room >= adapter_pages

    def _drop_late(self, now: float, out: SchedulerOutput) -> None:
        """Early abort: a queued request still without its first token after the SLO can no
        longer meet it; serving it would only make the requests behind it late too."""
        late = [r for r in self.waiting
                if r.first_token_time is None and now - r.arrival_time > self.slo_ttft_s]
        for r in late:
            self.waiting.remove(r)
            out.dropped.append(r)

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        out = SchedulerOutput()
        now = time.monotonic() if now is None else now
        if self.slo_ttft_s is not None:
            self._drop_late(now, out)
        budget = self.max_batched_tokens
        # 1. Running requests, oldest first; preempt from the newest end when the pool is dry.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if len(request.output_token_ids) >= request.params.max_tokens:
                i += 1  # its last token is still being sampled: nothing more to compute
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self._grow(request, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, n))
                budget -= n
                i += 1
        # 2. Waiting requests, in admission order, while they fit (not in a step that had to
        #    preempt). One whose adapter is still being read from disk is passed over, not
        #    waited for; the look-ahead past such requests is bounded so a long queue costs a
        #    bounded scan.
        waits = self._admission_waits(out)
        if waits and self.cheap_step_tokens <= 0:  # (no step is cheap: the queue just waits)
            self._steps_without_admission += 1
            return out
        order = self._admission_order(now)
        cheap_budget = self._cheap_admission_budget(out, budget, order[0]) if waits else None
        if waits and cheap_budget is None:
            self._steps_without_admission += 1
            return out
        budget = budget if cheap_budget is None else cheap_budget
        admitted = len(out.scheduled)
        joined: list[Request] = []
        passed_over = 0
        for request in order:
            if out.preempted or budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if request.adapter is not None and not self.adapter_ready(request.adapter):
                passed_over += 1
                if passed_over >= self.max_num_seqs:
                    break
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if cheap_budget is not None and n < request.num_tokens - request.num_computed_tokens:
                break  # (a chunk would leave its rest to a later step that is not cheap)
            kv_pages = self._pages_for(request.num_computed_tokens + n) - len(request.block_table)
            if not self._fits(request, kv_pages):
                break
            if request.adapter is not None and not self.adapters.acquire(request.adapter):
                break
            if not self._grow(request, n):  # cannot fail after the check above, kept as a guard
                if request.adapter is not None:
                    self.adapters.release(request.adapter)
                break
            joined.append(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, n))
            budget -= n
        for request in joined:
            self.waiting.remove(request)
        if len(out.scheduled) > admitted:
            self._steps_without_admission = 0
        elif cheap_budget is not None:  # (nothing fitted: the step counts as one that waited)
            self._steps_without_admission += 1
        return out

    def _admission_waits(self, out: SchedulerOutput) -> bool:
        """Whether the queue waits this step (see ``admit_wait_steps``): only a step of pure
        decode waits, only while requests run, and with ``wait_only_when_full`` only while the
        batch cannot take the whole queue."""
        decode_only = bool(out.scheduled) and all(s.num_new_tokens == 1 for s in out.scheduled)
        full = len(self.waiting) > self.max_num_seqs - len(self.running)
        return (bool(self.waiting) and decode_only and (full or not self.wait_only_when_full)
                and self._steps_without_admission < self.admit_wait_steps)

    def _cheap_admission_budget(self, out: SchedulerOutput, budget: int,
                                first: Request) -> int | None:
        """In a step where the queue would wait: the tokens it may take while the step stays
        cheap (``cheap_step_tokens``), or None when the next request to join (``first``) does
        not fit in that with its whole prompt."""
        cheap = min(budget, self.cheap_step_tokens - len(out.scheduled))
        return cheap if first.num_tokens - first.num_computed_tokens <= cheap else None

    def prefetch_order(self, now: float | None = None) -> list[Request]:
        """The queue in the order the next admissions will take it: adapters prefetched in this
        order are the ones the next steps read. (With newest first, the queue's head is the
        request that joins last.)"""
        return self._admission_order(time.monotonic() if now is None else now)

    def _admission_order(self, now: float) -> list[Request]:
        """The queue in the order admission tries it, cut at what one step can look at (it
        admits at most ``max_num_seqs`` and passes over at most as many). First come, first
        served; with ``lifo_after_s``, once the oldest new request has waited longer than that,
        preempted requests first (they hold generated tokens), then the newest first."""
        limit = 2 * self.max_num_seqs
        oldest_new = (None if self.lifo_after_s is None else
                      next((r for r in self.waiting if r.num_preemptions == 0), None))
        if oldest_new is None or now - oldest_new.arrival_time <= self.lifo_after_s:
            return list(islice(self.waiting, limit))
        resumed = [r for r in islice(self.waiting, limit) if r.num_preemptions > 0]
        newest = (r for r in reversed(self.waiting) if r.num_preemptions == 0)
        return resumed + list(islice(newest, limit - len(resumed)))

    def _preempt(self, request: Request) -> None:
        self._release(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        self.pool.free(request.block_table)
        request.block_table = []
        if request.adapter is not None and request.status is RequestStatus.RUNNING:
            self.adapters.release(request.adapter)

    def finish(self, request: Request, reason: str) -> None:
        """Retire a request (finished or aborted): every page it held goes back to the pool."""
        if request.status is RequestStatus.FINISHED:
            return
        self._release(request)
        if request in self.running:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def pinned_adapters(self) -> dict[str, int]:
        """Adapter name -> number of running or waiting requests that use it."""
        counts: dict[str, int] = {}
        for r in list(self.running) + list(self.waiting):
            if r.adapter is not None:
                counts[r.adapter] = counts.get(r.adapter, 0) + 1
        return counts
