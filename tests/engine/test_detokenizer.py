"""Detokenizer: the DecodeStream path and the two-decode path give the same text and the same
deltas, token by token, on SmolLM2's byte-level BPE tokenizer, the benchmarks' word-level one
and a small Llama-2-style one (byte-fallback tokens, a decoder that strips the leading space):
multi-byte characters split over tokens, special tokens inside the stream, stop strings across
token boundaries, random token soup, and streams that hand over to the decode path mid-request."""

from __future__ import annotations

import random

import pytest

from benchmarks.prompts import write_word_tokenizer
from slora_backend import detokenizer
from slora_backend.detokenizer import Detokenizer

MULTIBYTE = "Crème brûlée 🍮 costs 5€ — 日本語, 한국어, Ελληνικά 👩‍👩‍👧 naïve façade 🇫🇷!"


@pytest.fixture(scope="module")
def smol(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2))


@pytest.fixture(scope="module")
def word_dir(tmp_path_factory):
    return write_word_tokenizer(tmp_path_factory.mktemp("word_tok"), 300)


@pytest.fixture(scope="module")
def word(word_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(word_dir))


@pytest.fixture(scope="module")
def llama_like():
    """Llama 2's pipeline (▁ for spaces, <0xNN> byte-fallback tokens, Strip of one leading space
    on decode) with a BPE vocabulary trained on two sentences."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    corpus = ["The capital of France is Paris. The crème brûlée costs five euros.",
              "Hello there, world. It is nine o'clock and all is well."] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=40))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _run(tok, prompt_ids, stream, stop=()):
    """Feed ``stream`` one token at a time as the engine does; what the consumer would see."""
    det = Detokenizer(tok, prompt_ids, tuple(stop))
    steps = []
    for t in stream:
        det.add(t)
        steps.append((det.delta(final=False), det.stopped))
    steps.append((det.delta(final=True), det.stopped))
    return det, steps


def _both(tok, prompt_ids, stream, stop=(), expect_stream=True):
    """Run the fast path and the forced fallback on the same tokenizer; they must agree."""
    fast, fast_steps = _run(tok, prompt_ids, stream, stop)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(detokenizer, "DecodeStream", None)
        slow, slow_steps = _run(tok, prompt_ids, stream, stop)
    assert slow._stream is None
    if expect_stream:
        assert fast._stream is not None, "the DecodeStream path was not used (or gave up)"
    assert fast_steps == slow_steps
    assert (fast.text, fast.emitted, fast.stopped) == (slow.text, slow.emitted, slow.stopped)
    return fast, fast_steps


def _special_ids(tok):
    return sorted(set(tok.all_special_ids))


def test_fast_path_is_used_for_fast_tokenizers(smol, word):
    assert Detokenizer(smol, [1, 2], ())._stream is not None
    assert Detokenizer(word, [1, 2], ())._stream is not None
    det = Detokenizer(None, [1, 2], ("x",))
    det.add(5)
    assert det._stream is None and det.text == "" and det.delta(final=True) == ""


def test_plain_text_keeps_the_leading_space(smol):
    prompt = smol.encode("Say:")
    det, steps = _both(smol, prompt, smol.encode(" Hello there, world. It's 9 o'clock."))
    assert det.text == " Hello there, world. It's 9 o'clock."
    assert steps[0][0] == " Hello"


def test_multibyte_characters_split_over_tokens(smol):
    ids = smol.encode(MULTIBYTE)
    # The stream really does split characters: some tokens decode to U+FFFD on their own.
    assert any(smol.decode([t]).endswith("\ufffd") for t in ids)
    det, steps = _both(smol, smol.encode("Say:"), ids)
    assert det.text == smol.decode(ids)
    assert all("\ufffd" not in d for d, _ in steps)
    assert any(d == "" for d, _ in steps[:-1])  # held back until the character was complete


def test_special_tokens_are_skipped(smol, word):
    ids = smol.encode(MULTIBYTE)
    specials = _special_ids(smol) + [3, 7, 16]  # <repo_name>, <gh_stars>, <empty_output>
    rng = random.Random(0)
    mixed = []
    for t in ids:
        mixed.append(t)
        if rng.random() < 0.4:  # also between the bytes of one character
            mixed.append(rng.choice(specials))
    det, _ = _both(smol, smol.encode("Say:"), [specials[0]] + mixed + [specials[1]])
    assert det.text == smol.decode(ids)
    # Only special tokens: nothing is ever released.
    det, steps = _both(smol, smol.encode("Say:"), specials * 3)
    assert det.text == "" and all(d == "" for d, _ in steps)

    stream = [5, 1, 6, 2, 0, 7, 8, 1, 2, 9]  # w0, w1, w2 are unk/bos/eos
    det, _ = _both(word, [3, 4], stream)
    assert det.text == " " + word.decode(stream, skip_special_tokens=True)


@pytest.mark.parametrize("stop", [
    ("France is",), ("Paris. The",), ("🍮",), ("xyz", "of Fr"), ("ée 🍮 c", "never"), ("s",),
])
def test_stop_strings_across_token_boundaries(smol, stop):
    text = " The capital of France is Paris. The crème brûlée 🍮 costs 5€."
    ids = smol.encode(text)
    det, steps = _both(smol, smol.encode("Say:"), ids, stop)
    first = min(text.find(s) for s in stop if s in text)
    assert det.stopped and det.text == text[:first]
    assert "".join(d for d, _ in steps) == det.text


def test_word_tokenizer_streams_and_stops(word):
    stream = list(range(10, 60))
    full = " " + " ".join(f"w{i}" for i in stream)  # the space after the prompt's last word
    det, _ = _both(word, [3, 4, 5, 6, 7], stream)
    assert det.text == full
    det, steps = _both(word, [3], stream, stop=("1 w22", "w20 w21"))
    assert det.text == full[:full.index("w20 w21")]
    assert "".join(d for d, _ in steps) == det.text


def test_prompt_contexts(smol, word):
    ids = smol.encode(" Hi 🍮 there")
    _both(smol, [], ids)  # no prompt at all
    _both(smol, _special_ids(smol), ids)  # a prompt of special tokens only
    mid = smol.encode("ab 👩‍👩‍👧")  # its last four tokens start mid-character
    assert smol.decode(mid[-4:]).startswith("\ufffd")
    _both(smol, mid, ids)
    # A prompt that ends mid-character keeps the decode path for the whole request.
    cut = smol.encode("Say 🍮")[:-1]
    assert smol.decode(cut).endswith("\ufffd")
    det, _ = _both(smol, cut, ids, expect_stream=False)
    assert det._stream is None
    _both(word, [], list(range(3, 20)))


def test_random_token_soup(smol, word):
    """Random ids, heavy in lone bytes >= 0x80, so invalid UTF-8 ends up inside the text."""
    byte_level = smol.backend_tokenizer.decoder
    high_bytes = [i for i in range(len(smol)) if len(smol.convert_ids_to_tokens(i)) == 1
                  and byte_level.decode([smol.convert_ids_to_tokens(i)]) == "\ufffd"]
    assert len(high_bytes) > 64
    rng = random.Random(1)
    specials = _special_ids(smol)
    for _ in range(60):
        stream = [rng.choice(high_bytes) if rng.random() < 0.5
                  else rng.choice(specials) if rng.random() < 0.1
                  else rng.randrange(len(smol)) for _ in range(48)]
        prompt = [rng.randrange(len(smol)) for _ in range(rng.randrange(0, 6))]
        if smol.decode(prompt[-4:], skip_special_tokens=True).endswith("\ufffd"):
            prompt = []
        text = _both(smol, prompt, stream)[0].text
        if len(text) > 6:
            a = rng.randrange(len(text) - 4)
            _both(smol, prompt, stream, stop=(text[a:a + rng.randrange(2, 5)],))
    for _ in range(20):
        stream = [rng.randrange(len(word)) for _ in range(40)]
        det, _ = _both(word, [rng.randrange(len(word)) for _ in range(3)], stream)
        words = det.text.split()
        if len(words) > 3:
            _both(word, [], stream, stop=(" ".join(words[1:3])[1:-1],))


@pytest.mark.parametrize("fail_at", [1, 5, 9, 10, 11, 25])
def test_a_failing_step_hands_over_to_the_decode_path(smol, monkeypatch, fail_at):
    """If a DecodeStream step raises (e.g. its prefix check), the request carries on decoding."""
    real = detokenizer.DecodeStream

    class Flaky:
        def __init__(self, **kwargs):
            self.inner, self.n = real(**kwargs), 0

        def step(self, tok, token_id):
            self.n += 1
            if self.n == fail_at:
                raise Exception("Invalid prefix encountered")
            return self.inner.step(tok, token_id)

    ids = smol.encode(MULTIBYTE)
    stop = ("日本語, 한",)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(detokenizer, "DecodeStream", None)
        want = _run(smol, smol.encode("Say:"), ids, stop)[1]
    monkeypatch.setattr(detokenizer, "DecodeStream", Flaky)
    det, got = _run(smol, smol.encode("Say:"), ids, stop)
    assert det._stream is None
    assert got == want


def test_old_tokenizers_without_ids_fall_back(smol, monkeypatch):
    class NoIds:
        def __init__(self, skip_special_tokens=False):
            pass

    monkeypatch.setattr(detokenizer, "DecodeStream", NoIds)
    det, steps = _run(smol, smol.encode("Say:"), smol.encode(" Hi 🍮"))
    assert det._stream is None and det.text == " Hi 🍮"


def test_clean_up_tokenization_spaces(smollm2):
    """transformers' Python-side clean-up (" ." -> ".", " n't" -> "n't", ...) is not part of the
    Rust decode: a WordLevel tokenizer that applies it keeps the decode path (DecodeStream would
    release " ." where the decode path releases "."); SmolLM2 (BPE, where transformers 5 skips
    the clean-up) still agrees."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "well", ",", "it", "is", "n't", "so", ".", "i", "'m", "!", "?"]
    wl = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wl.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    for clean in (False, True):
        tok = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="<unk>", bos_token="<s>",
                                      eos_token="</s>", clean_up_tokenization_spaces=clean)
        ids = tok.encode("well , it is n't so . i 'm so ! is it ?")
        det, _ = _both(tok, tok.encode("i"), ids, stop=("n't s",), expect_stream=not clean)
        assert det.text == (" well, it is" if clean else " well , it is ")
        assert det._stream is None if clean else det._stream is not None

    smol_clean = AutoTokenizer.from_pretrained(str(smollm2), clean_up_tokenization_spaces=True)
    ids = smol_clean.encode(" Well , it is n't so . Do n't ! I 'm sure ? Yes 's")
    det, _ = _both(smol_clean, smol_clean.encode("Say:"), ids,
                   expect_stream=detokenizer._stream_backend(smol_clean) is not None)
    assert det.text == smol_clean.decode(ids)


def test_byte_fallback_tokenizer(llama_like):
    tok = llama_like
    assert detokenizer._stream_backend(tok) is not None
    ids = tok.encode(MULTIBYTE)
    pieces = tok.convert_ids_to_tokens(ids)
    assert sum(p.startswith("<0x") for p in pieces) > 20  # characters split over byte tokens
    det, steps = _both(tok, tok.encode("Say:"), ids)
    assert det.text == " " + MULTIBYTE  # the decoder strips the leading space without context
    assert all("\ufffd" not in d for d, _ in steps)
    text = "The capital of France is Paris. Hello 🍮 there."
    full = " " + text  # the normalizer prepends ▁ to the encoded text
    for stop in (("ce is P",), ("o 🍮 t",), ("🍮",), ("nowhere", "is Paris. H")):
        det, _ = _both(tok, tok.encode("Say:"), tok.encode(text), stop)
        assert det.stopped and det.text == full[:min(full.find(s) for s in stop if s in full)]
    specials = _special_ids(tok)
    mixed = []
    for i, t in enumerate(ids):  # special tokens also between the bytes of one character
        mixed += [t, specials[i % len(specials)]] if i % 3 == 0 else [t]
    det, _ = _both(tok, [], mixed)
    assert det.text == MULTIBYTE


def test_byte_fallback_random_soup_hands_over(llama_like):
    """Random byte tokens make invalid UTF-8, which ByteFallback turns into one U+FFFD per byte,
    so a later token can change text decoded before it: DecodeStream then raises (its prefix
    check) and the request carries on with the decode path, giving the same deltas."""
    tok = llama_like
    rng = random.Random(2)
    handed_over = 0
    for _ in range(150):
        stream = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 6))]
        det, _ = _both(tok, prompt, stream, expect_stream=False)
        started = not tok.decode(prompt[-4:], skip_special_tokens=True).endswith("\ufffd")
        handed_over += started and det._stream is None
        if len(det.text) > 5:
            a = rng.randrange(len(det.text) - 3)
            _both(tok, prompt, stream, stop=(det.text[a:a + 3],), expect_stream=False)
    assert handed_over > 10
