"""A step is built while the one before it runs (``step_in_flight``): a request that the step in
flight ends (EOS, abort) has its speculative row dropped, outputs never show a placeholder,
``max_tokens`` is never overrun, and every page comes back."""

from __future__ import annotations

from slora_backend import Engine, EngineConfig, SamplingParams
from slora_backend.request import PENDING
from tests.conftest import make_adapter

PROMPTS = ["The quick brown fox", "Paris is", "1 2 3"]


def _engine(tiny_models, tmp_path) -> Engine:
    make_adapter(tiny_models["gqa"], tmp_path / "a8", 8, ["q_proj", "v_proj"], 16, seed=3)
    return Engine(EngineConfig(base_model=str(tiny_models["gqa"]), adapter_root=str(tmp_path),
                               pool_pages=128, block_tokens=4))


def test_eos_seen_one_step_late_ends_the_request_exactly(tiny_models, tmp_path):
    engine = _engine(tiny_models, tmp_path)
    loras = ["a8", None, "a8"]
    free = [o.token_ids for o in engine.generate(
        PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True), loras)]
    eos = free[0][2]  # request 0's third token becomes the end of sequence
    engine.eos_ids = {eos}
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=8), loras)
    for out, tokens in zip(outs, free):
        want = tokens[:tokens.index(eos)] if eos in tokens else tokens
        assert out.token_ids == want
        assert out.finish_reason == ("stop" if eos in tokens else "length")
    assert outs[0].finish_reason == "stop" and len(outs[0].token_ids) <= 2
    assert engine.pool.used_by["kv"] == 0


def test_max_tokens_is_not_overrun(tiny_models, tmp_path):
    """A request whose pending token is its last is not scheduled again: 1 prefill + 2 decode
    steps for 3 tokens, not a fourth speculative one."""
    engine = _engine(tiny_models, tmp_path)
    (out,) = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=3, ignore_eos=True), ["a8"])
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    assert engine.steps == 3


def test_abort_while_a_step_is_in_flight(tiny_models, tmp_path):
    engine = _engine(tiny_models, tmp_path)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    full = [o.token_ids for o in engine.generate(PROMPTS, params, ["a8", None, "a8"])]
    seen: dict[str, list] = {}
    ids = [engine.add_request(p, params, lora,
                              on_output=lambda o: seen.setdefault(o.request_id, []).append(o))
           for p, lora in zip(PROMPTS, ["a8", None, "a8"])]
    for _ in range(4):
        engine.step()
    assert engine._in_flight is not None and engine.scheduler.running[0].num_pending_tokens == 1
    engine.abort(ids[0])
    while engine.scheduler.has_work() or engine._inbox or engine._aborts:
        engine.step()
    finals = [seen[i][-1] for i in ids]
    assert finals[0].finish_reason == "abort" and PENDING not in finals[0].token_ids
    assert finals[0].token_ids == full[0][:len(finals[0].token_ids)]
    assert [f.token_ids for f in finals[1:]] == full[1:]
    for outs in seen.values():  # every streamed delta is a real token, in order
        assert all(PENDING not in o.token_ids and PENDING not in o.delta_token_ids for o in outs)
    assert engine.pool.used_by["kv"] == 0
