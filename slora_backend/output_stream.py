"""One request's output as its consumer sees it: text deltas, token deltas, the final result."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .detokenizer import Detokenizer
from .request import Request, RequestOutput, RequestStatus

OutputCallback = Callable[[RequestOutput], None]


class OutputStream:
    """Detokenizes a request's tokens and hands ``RequestOutput``s to its callback.

    ``broken`` turns true when the callback raised: the engine then aborts the request rather
    than let one faulty consumer stop the loop for everyone.
    """

    def __init__(self, request: Request, tokenizer: Any, callback: OutputCallback | None) -> None:
        self.request = request
        self.detok = Detokenizer(tokenizer, request.prompt_token_ids, request.params.stop)
        self.callback = callback
        self.broken = False

    def add_token(self, token: int) -> bool:
        """Append a generated token's text; True when a stop string has ended the output."""
        self.detok.add(token)
        return self.detok.stopped

    def emit(self, delta_tokens: list[int], error: str | None = None) -> RequestOutput:
        """The request's state now, with what is new since the last emit."""
        r = self.request
        final = r.status is RequestStatus.FINISHED
        delta_text = self.detok.delta(final=final)
        out = RequestOutput(
            request_id=r.request_id,
            token_ids=r.known_output_ids,
            text=self.detok.text if final else self.detok.text[: self.detok.emitted],
            delta_token_ids=delta_tokens,
            delta_text=delta_text,
            finished=final,
            finish_reason=r.finish_reason,
            num_prompt_tokens=r.num_prompt_tokens,
            error=error,
        )
        if self.callback is not None:
            try:
                self.callback(out)
            except Exception:  # a broken consumer must not stop the engine for everyone
                self.broken = True
        return out
