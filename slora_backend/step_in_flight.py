"""A launched step whose sampled tokens the host has not read yet.

The engine builds and launches step n+1 while the GPU still runs step n, and reads step n's
tokens only then: the host's part of a step (scheduling, batch metadata, detokenizing, emitting
outputs) overlaps the GPU's instead of leaving it idle (at batch ~250 on the H200 that host part
is about a third of a decode step).

What that asks of the rest of the engine:

- a request that samples in step n gets a placeholder output token (``request.PENDING``) at
  launch, so step n+1 is scheduled as if the token were known; its input is copied from step
  n's tokens on the device (``PendingTokens``);
- step n+1 is speculative for requests that step n ends (an EOS or a stop string, seen only
  when the tokens are read): their rows are computed and dropped. ``max_tokens`` is known in
  advance, so a request whose pending token is its last is not scheduled again;
- pages freed while step n runs may still be written by it: adapter copies into free pages wait
  for its ``done`` event (``AdapterCopier``); KV pages are reused only by later steps on the
  same stream.
"""

from __future__ import annotations

import torch

from .model_runner import PendingTokens
from .request import PENDING, Request


class StepInFlight:
    def __init__(self, sampling: list[Request], tokens: torch.Tensor, kind: str = "eager",
                 started: torch.cuda.Event | None = None) -> None:
        """``tokens``: the device tokens of ``sampling`` (one per request, in order, or
        ``sampler.NON_FINITE``), just sampled on the compute stream. Appends each request's
        placeholder and starts the copy of the tokens to the host. ``kind``: how the step ran
        (``step_clock.STEP_KINDS``); ``started``: a timing event recorded on the stream as its
        launch began (``step_clock.DeviceClock``)."""
        self.requests = sampling
        self.kind = kind
        self.started = started
        self.slots = []  # each request's placeholder index in its output_token_ids
        for r in sampling:
            self.slots.append(len(r.output_token_ids))
            r.output_token_ids.append(PENDING)
            r.num_pending_tokens += 1
        # (the next step's inputs: a NON_FINITE row's input must still be a valid token id; that
        # row is dropped once the host reads it)
        self.tokens = tokens.clamp(min=0)
        self.done: torch.cuda.Event | None = None
        if tokens.is_cuda:
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.done = torch.cuda.Event(enable_timing=True)
            self.done.record()
        else:
            self.host = tokens

    def pending(self) -> PendingTokens:
        """Where the next step finds these tokens on the device."""
        return PendingTokens(self.tokens, {r.request_id: i for i, r in enumerate(self.requests)})

    def wait(self) -> None:
        """Block until the step has finished on the GPU and its tokens are on the host."""
        if self.done is not None:
            self.done.synchronize()

    def read(self) -> list[int]:
        """The tokens, once the step has finished on the GPU (blocks until then)."""
        self.wait()
        return self.host.tolist()
