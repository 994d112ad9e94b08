"""Compile the kernels' variants before serving: a compile in the middle of serving stalls every
running request for seconds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import SamplingParams
from .errors import InvalidRequestError

if TYPE_CHECKING:
    from .engine import Engine


def warm_up(engine: Engine) -> None:
    """Serve a few requests of the engine's own: for the base model and one adapter of each
    registered rank (the batch's largest rank picks LoRA tiles), prompts short and long enough
    for each prefill tile, joining a batch that already decodes (a mixed step). Afterwards no
    page, request or count of theirs remains."""
    store = engine.adapters.store
    by_rank = engine.adapters.one_per_rank()
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    vocab = engine.spec.vocab_size
    lengths = [n for n in (8, 24, 100) if n + params.max_tokens <= engine.max_model_len]
    for name in [None, *(by_rank[r] for r in sorted(by_rank))]:
        ids = []
        for length in lengths:
            prompt = [1 + (7 * i) % (vocab - 1) for i in range(length)]
            try:
                ids.append(engine.add_request(prompt, params, name))
            except InvalidRequestError:  # a pool too small for it: that variant waits
                continue
            engine.step()
        while any(i in engine.outputs for i in ids):
            engine.step()
            engine._idle_while_reading()
        if name is not None:
            store.get(name).total_requests -= len(ids)  # not a user's requests
    engine.outputs.generated_tokens = engine.outputs.finished_requests = engine.steps = 0
