"""What a request must satisfy before it is queued: a prompt the model can read, an answer that
fits the context, and pages the pool can ever give it. Each refusal names the value and the limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .adapters.validation import AdapterEntry
from .config import SamplingParams
from .errors import InvalidRequestError
from .layout import PoolLayout
from .page_pool import PagePool


class RequestChecker:
    def __init__(self, tokenizer: Any | None, vocab_size: int, max_model_len: int,
                 layout: PoolLayout, pool: PagePool, adapter_pool: PagePool) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.layout = layout
        self.pool = pool
        self.adapter_pool = adapter_pool  # the pool itself under unified paging

    def token_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """The prompt as token ids (text is tokenized), each inside the vocabulary."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: give prompts as token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise InvalidRequestError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return ids

    def check(self, token_ids: list[int], params: SamplingParams, adapter: AdapterEntry | None) -> None:
        """Refuse a request that could never run: longer than the context, stop strings without a
        tokenizer, or more pages (its whole context's KV, plus its adapter's) than the pool has."""
        n, limit = len(token_ids), self.max_model_len
        if n + params.max_tokens > limit:
            if n >= limit:
                raise InvalidRequestError(f"prompt has {n} tokens; the context holds {limit}")
            raise InvalidRequestError(
                f"max_tokens {params.max_tokens} is above the limit: the prompt has {n} tokens, "
                f"so at most {limit - n} can follow within the {limit}-token context")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this model has none")
        worst = self.layout.kv_pages(n + params.max_tokens)
        adapter_pages = adapter.plan.num_pages if adapter is not None else 0
        if self.adapter_pool is self.pool:
            worst += adapter_pages
        elif adapter_pages > self.adapter_pool.num_pages:
            raise InvalidRequestError(f"adapter {adapter.name!r} needs {adapter_pages} pages, the "
                                      f"adapter partition has {self.adapter_pool.num_pages}")
        if worst > self.pool.num_pages:
            raise InvalidRequestError(
                f"request needs up to {worst} pages but the pool has {self.pool.num_pages}")
