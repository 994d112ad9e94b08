"""Incremental, UTF-8-safe detokenization with stop-string handling for one request.

Each generated token is decoded against a short window of the tokens before it. With a
Hugging Face fast tokenizer that is one ``tokenizers.decoders.DecodeStream.step`` call per
token (Rust); other tokenizers take two ``tokenizer.decode`` calls per token, which computes
the same deltas.
"""

from __future__ import annotations

from typing import Any

try:
    from tokenizers import Tokenizer as _RustTokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # no tokenizers, or one too old for DecodeStream: the decode path serves
    _RustTokenizer = DecodeStream = None

# How many prompt tokens to decode with the first output tokens, so that tokenizers which
# drop or add a leading space at the start of a decode see the right context.
_PROMPT_CONTEXT = 4


def _stream_backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` whose ``decode`` is exactly ``tokenizer.decode``, or None.

    That holds for a transformers fast tokenizer that neither overrides ``decode`` nor applies
    its Python-side ``clean_up_tokenization`` (which transformers 5 skips for BPE models).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if DecodeStream is None or not isinstance(backend, _RustTokenizer):
        return None
    try:
        from transformers import PreTrainedTokenizerFast as Fast
    except ImportError:
        return None
    cls = type(tokenizer)
    overridden = any(getattr(cls, name, None) is not getattr(Fast, name, None)
                     for name in ("decode", "_decode"))
    if not isinstance(tokenizer, Fast) or overridden:
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        forced = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
        bpe_skips_cleanup = (hasattr(tokenizer, forced) and not getattr(tokenizer, forced)
                             and type(backend.model).__name__ == "BPE")
        if not bpe_skips_cleanup:
            return None
    return backend


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
        # DecodeStream runs the same prefix/read-offset algorithm as the decode path below, but
        # as one Rust call per token instead of two decodes through transformers' Python layers
        # (about 1 us against 6 us a token). ``ids`` and the offsets are still kept, so a
        # step that fails can hand over to the decode path mid-stream.
        self._backend = None if tokenizer is None else _stream_backend(tokenizer)
        self._stream = None
        if self._backend is not None:
            try:
                context = self._backend.decode(self.ids, skip_special_tokens=True)
                # DecodeStream only adopts a context that decodes to complete characters; the
                # decode path adopts any, so a prompt cut mid-character keeps the decode path.
                if not context.endswith("\ufffd"):
                    self._stream = DecodeStream(ids=list(self.ids), skip_special_tokens=True)
            except Exception:  # e.g. a tokenizers whose DecodeStream takes no ids=
                self._stream = None

    def add(self, token_id: int) -> None:
        if self.tokenizer is None or self.stopped:
            return
        self.ids.append(token_id)
        if self._stream is not None:
            try:
                new = self._stream.step(self._backend, token_id)
            except Exception:  # e.g. decoded text that does not extend the previous one
                self._stream = None  # the decode path redoes this token from the same offsets
            else:
                if new is not None:
                    self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                    self._append(new)
                return
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
