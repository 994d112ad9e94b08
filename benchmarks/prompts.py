"""Prompts of an exact token length: token ids for the engine, text for the Triton path.

Random-weight models have no tokenizer, and the public ``slora`` model takes text. Two ways to get
text whose tokenization has exactly the trace's length:

- ``write_word_tokenizer(dir, vocab_size)``: a word-level tokenizer ``w0 .. w{V-1}`` (one word =
  one token, no special tokens added), so a prompt of L tokens is L words. Its vocabulary matches
  a random model's (the engine refuses a tokenizer larger than the model's vocabulary, so
  SmolLM2's 49152-token tokenizer cannot drive the 32000-token Llama-2-7B shape).
- any Hugging Face tokenizer (e.g. SmolLM2's): words that encode to one token each are joined,
  then the count is checked and corrected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .workload import Request

WORD_TOKENIZER_MARKER = "slora-bench-word-tokenizer"


def token_prompts(requests: tuple[Request, ...] | list[Request], vocab_size: int,
                  seed: int = 0) -> list[list[int]]:
    """Random token ids of each request's ``prompt_len`` (ids 3.. avoid common special ids)."""
    rng = np.random.RandomState(seed)
    return [rng.randint(3, vocab_size, r.prompt_len).tolist() for r in requests]


def write_word_tokenizer(out: Path, vocab_size: int) -> Path:
    """A word-level tokenizer of exactly ``vocab_size`` tokens (``w<i>``), saved for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    if (out / "tokenizer.json").is_file() and (out / WORD_TOKENIZER_MARKER).is_file():
        if (out / WORD_TOKENIZER_MARKER).read_text().strip() == str(vocab_size):
            return out
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1",
                                   eos_token="w2", pad_token="w0")
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    (out / WORD_TOKENIZER_MARKER).write_text(f"{vocab_size}\n")
    return out


class TextPrompter:
    """Text prompts whose ``tokenizer.encode`` length (as the engine counts it) is exact."""

    def __init__(self, tokenizer: Any, seed: int = 0, pool_size: int = 2000) -> None:
        self.tokenizer = tokenizer
        self.rng = np.random.RandomState(seed)
        self.overhead = len(tokenizer.encode("hello")) - len(
            tokenizer.encode("hello", add_special_tokens=False))
        self.words = self._single_token_words(pool_size)
        if len(self.words) < 10:
            raise ValueError("the tokenizer has too few single-token words to build prompts")

    def _single_token_words(self, limit: int) -> list[str]:
        tok = self.tokenizer
        vocab = tok.get_vocab()
        special = set(tok.all_special_ids)
        words = []
        for piece in sorted(vocab, key=vocab.get):
            word = piece.lstrip("Ġ▁")
            if vocab[piece] in special or not (word.isascii() and word.isalnum()
                                               and any(c.isalpha() for c in word)
                                               and 2 <= len(word) <= 8):
                continue
            if len(tok.encode(" " + word, add_special_tokens=False)) == 1:
                words.append(word)
                if len(words) >= limit:
                    break
        return words

    def prompt(self, num_tokens: int) -> str:
        target = max(1, num_tokens - self.overhead)
        words = [self.words[i] for i in self.rng.randint(0, len(self.words), target)]
        for _ in range(8):  # merges across word boundaries are rare; correct them
            text = " " + " ".join(words)
            have = len(self.tokenizer.encode(text))
            if have == num_tokens:
                return text
            if have > num_tokens and len(words) > 1:
                words = words[: len(words) - (have - num_tokens)] or words[:1]
            elif have < num_tokens:
                words += [self.words[i] for i in self.rng.randint(0, len(self.words),
                                                                   num_tokens - have)]
            else:
                break
        return " " + " ".join(words)  # off by a token or two: reported by the replay


def text_prompts(requests, tokenizer: Any, seed: int = 0) -> list[str]:
    prompter = TextPrompter(tokenizer, seed)
    return [prompter.prompt(r.prompt_len) for r in requests]
