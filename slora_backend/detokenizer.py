"""Incremental, UTF-8-safe detokenization with stop-string handling for one request."""

from __future__ import annotations

from typing import Any

# How many prompt tokens to decode with the first output tokens, so that tokenizers which
# drop or add a leading space at the start of a decode see the right context.
_PROMPT_CONTEXT = 4


class Detokenizer:
    """Turns a growing list of token ids into text deltas.

    A delta is released only once the decoded text no longer ends in an incomplete UTF-8
    sequence (U+FFFD), and while stop strings are set the last ``len(longest stop) - 1``
    characters are held back so that a stop string split over two steps never leaks out.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all text decoded so far (stop strings removed)
        self.emitted = 0  # characters of ``text`` already released
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.stopped = False

    def add(self, token_id: int) -> None:
        if self.tokenizer is None or self.stopped:
            return
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._append(new)

    def _append(self, new: str) -> None:
        start = max(0, len(self.text) - self.holdback)
        self.text += new
        for s in self.stop:
            at = self.text.find(s, start)
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
                start = min(start, at)

    def delta(self, final: bool) -> str:
        """Text not yet released; on the last call everything left is released."""
        end = len(self.text) if final or self.stopped else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
