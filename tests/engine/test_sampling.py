"""Sampling: seeds reproduce, top-k/top-p restrict, stop strings and EOS end requests."""

from __future__ import annotations

import pytest
import torch

from slora_backend import Engine, EngineConfig, SamplingParams
from slora_backend.config import SamplingParams as SP
from slora_backend.detokenizer import Detokenizer
from slora_backend.sampler import Sampler


@pytest.fixture(scope="module")
def engine(smollm2):
    return Engine(EngineConfig(base_model=str(smollm2)))


PROMPT = "Write a short poem about the sea."


def test_same_seed_same_output_whatever_the_batch(engine):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    alone = engine.generate([PROMPT], p)[0].token_ids
    mixed = engine.generate(["Other prompt", PROMPT, "Third"],
                            [SamplingParams(max_tokens=5, temperature=1.0), p,
                             SamplingParams(max_tokens=3)])[1].token_ids
    assert alone == mixed
    other = engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=1.0, seed=99))
    assert other[0].token_ids != alone


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=8))[0].token_ids
    topk1 = engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=5.0, top_k=1,
                                                     seed=3))[0].token_ids
    assert greedy == topk1


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(200, 1)
    sampler = Sampler(torch.device("cpu"))
    ids = [f"r{i}" for i in range(200)]
    got = sampler.sample(logits, ids, [SP(temperature=1.0, top_k=2, seed=i) for i in range(200)])
    assert set(got) == {0, 1}
    # softmax([4,3,2,1,0]) = [.636, .234, .086, ...]: top_p 0.8 keeps the first two tokens.
    got = sampler.sample(logits, [f"p{i}" for i in range(200)],
                         [SP(temperature=1.0, top_p=0.8, seed=i) for i in range(200)])
    assert set(got) == {0, 1}
    got = sampler.sample(logits, [f"q{i}" for i in range(200)],
                         [SP(temperature=1.0, top_p=0.5, seed=i) for i in range(200)])
    assert set(got) == {0}


def test_eos_stops_unless_ignored(engine):
    chat = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True)
    out = engine.generate([chat], SamplingParams(max_tokens=40))[0]
    assert out.finish_reason == "stop"
    assert out.text == "The capital of France is Paris."
    assert engine.tokenizer.eos_token_id not in out.token_ids
    out = engine.generate([chat], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 40


def test_stop_string_ends_and_is_cut(engine):
    chat = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True)
    deltas = []
    rid = engine.add_request(chat, SamplingParams(max_tokens=40, stop=["France is"]),
                             on_output=lambda o: deltas.append(o))
    while engine.scheduler.has_work() or engine._inbox:
        engine.step()
    final = deltas[-1]
    assert final.request_id == rid
    assert final.finish_reason == "stop"
    assert final.text == "The capital of "
    assert "".join(d.delta_text for d in deltas) == final.text


def test_detokenizer_is_utf8_safe(engine):
    tok = engine.tokenizer
    text = "Crème brûlée 🍮 costs 5€ — 日本語"
    ids = tok.encode(text)
    detok = Detokenizer(tok, tok.encode("Say:"), ())
    pieces = []
    for t in ids:
        detok.add(t)
        piece = detok.delta(final=False)
        assert "\ufffd" not in piece
        pieces.append(piece)
    pieces.append(detok.delta(final=True))
    assert "".join(pieces) == tok.decode(ids)
