"""Steps that prefill, replayed in pieces (``PiecewiseGraphs``), give the eager path's logits.

CUDA graphs cannot be captured on CPU, so ``PiecewiseGraphs(capture=False)`` runs each piece
eagerly from the same padded static inputs a captured graph would read (token and rank buckets,
padding rows with no adapter and no KV write, the fixed LoRA split with padded segment tables),
with attention run between the pieces as on CUDA: this checks the cut at attention, the padding
and the metadata copying, not the capture (tests/gpu does that).
"""

from __future__ import annotations

import pytest
import torch

from slora_backend import Engine, EngineConfig, SamplingParams
from slora_backend.piecewise_graphs import (
    MAX_PROMPTS,
    TOKEN_BUCKETS,
    PiecewiseGraphs,
    token_buckets,
)
from tests.conftest import make_adapter
from tests.engine.test_triton_backend import DEVICE, _adapters


def _root(model_dir, tmp_path):
    root = _adapters(model_dir, tmp_path)  # r8 (q, v, down) and r16 (attention and gate/up)
    make_adapter(model_dir, root / "attn", 4, ["q_proj", "k_proj", "o_proj"], 8, seed=7)
    return root


class _Recorder:
    """Wraps a runner's ``execute``: keeps every step's logits and token count."""

    def __init__(self, runner) -> None:
        self.logits: list[torch.Tensor] = []
        self.tokens: list[int] = []
        execute = runner.execute

        def recorded(scheduled, residents, pending=None):
            out = execute(scheduled, residents, pending)
            self.logits.append(out.detach().float().cpu().clone())
            self.tokens.append(sum(s.num_new_tokens for s in scheduled))
            return out

        runner.execute = recorded


def _run(model_dir, root, backend: str, pieces: bool, prompts, loras, max_tokens,
         max_batched_tokens: int):
    """Greedy tokens, admitting one request per step (admit_wait_steps=0), and the recorder."""
    engine = Engine(EngineConfig(base_model=str(model_dir), adapter_root=str(root), device=DEVICE,
                                 kernel_backend=backend, pool_pages=256, block_tokens=4,
                                 max_num_seqs=8, max_batched_tokens=max_batched_tokens,
                                 admit_wait_steps=0, cuda_graphs=False))
    r = engine.runner
    if pieces:
        r.piecewise = PiecewiseGraphs(engine.model, r.ops, r.pool, r.kv_shape, 8,
                                      max_batched_tokens, capture=False, slot_tables=r.slot_tables)
    for name in {n for n in loras if n is not None}:
        # in host memory before any request: admission waits for no read, so both runs
        # schedule the same steps and their logits compare step by step
        engine.adapters.entry_for(name)
        engine.adapters.store.weights(name)
    recorder = _Recorder(r)
    finished = {}

    def collect(out):
        if out.finished:
            finished[out.request_id] = out

    ids = []
    for prompt, lora, n in zip(prompts, loras, max_tokens):
        ids.append(engine.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True), lora,
                                      on_output=collect))
        engine.step()
    while len(finished) < len(ids):
        engine.step()
    assert [finished[i].finish_reason for i in ids] == ["length"] * len(ids)
    return [finished[i].token_ids for i in ids], recorder, engine


def _prompts(n: int, vocab: int = 900) -> list[list[int]]:
    return [[100 + (31 * i + 7 * j) % vocab for j in range(3 + (11 * i) % 17)] for i in range(n)]


def test_piecewise_matches_eager_torch(tiny_models, tmp_path):
    """Torch ops, adapters of ranks 4 (attention only), 8 and 16 and the base model, prompts
    chunked beside decode tokens: every step's logits equal the eager path's, through several
    token and rank buckets with padding."""
    model = tiny_models["gqa"]
    root = _root(model, tmp_path)
    prompts = _prompts(10)
    loras = ["r8", None, "r16", "attn", "r8", "r16", None, "attn", "r16", "r8"]
    max_tokens = [3 + i % 5 for i in range(10)]
    eager, eager_rec, _ = _run(model, root, "torch", False, prompts, loras, max_tokens, 24)
    tokens, rec, engine = _run(model, root, "torch", True, prompts, loras, max_tokens, 24)
    assert tokens == eager
    assert rec.tokens == eager_rec.tokens
    for got, want in zip(rec.logits, eager_rec.logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    pieces = engine.runner.piecewise
    assert pieces.replays == len(rec.tokens)
    keys = set(pieces._graphs)
    assert {t for t, _, _ in keys} >= {16, 32}  # padded: no step had exactly 16 or 32 tokens
    assert any(n not in TOKEN_BUCKETS for n in rec.tokens)
    assert {(rank, targets) for _, rank, targets in keys} >= {(8, None), (16, None)}
    assert all(len(p.pieces) == engine.spec.num_layers + 1 for p in pieces._graphs.values())


def test_piecewise_matches_eager_between_the_powers_of_two(tiny_models, tmp_path):
    """Steps of 150-300 tokens pad to the 64-apart buckets (192, 256, 320), not to the next
    power of two, and still give the eager path's logits. The pool is tight, so the last
    prompt waits and then gets pages (and an adapter page) others freed: the padding rows' KV
    writes must go nowhere (indexed as is, slot -1 is the pool's last slot)."""
    model = tiny_models["gqa"]
    root = _root(model, tmp_path)
    prompts = [[100 + (13 * i + 7 * j) % 800 for j in range(length)]
               for i, length in enumerate((150, 170, 250, 300))]
    loras, max_tokens = ["r8", "r16", None, "attn"], [2, 2, 2, 2]
    eager, eager_rec, _ = _run(model, root, "torch", False, prompts, loras, max_tokens, 320)
    tokens, rec, engine = _run(model, root, "torch", True, prompts, loras, max_tokens, 320)
    assert tokens == eager
    for got, want in zip(rec.logits, eager_rec.logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert [n for n in rec.tokens if n > 1] == [150, 171, 251, 300]
    assert {t for t, _, _ in engine.runner.piecewise._graphs} >= {192, 256, 320}


def test_piecewise_matches_eager_triton(tiny_models, tmp_path):
    """The Triton kernels (interpreted on CPU): the fixed LoRA split (per-token kernels over
    min(T, max_batch) rows, segment kernels over padded segment tables) gives the eager mixed
    step's tokens and logits. Small: the interpreter is slow."""
    model = tiny_models["gqa"]
    root = _root(model, tmp_path)
    prompts = _prompts(3)
    loras = ["r8", "r16", None]
    max_tokens = [3, 2, 3]
    eager, eager_rec, _ = _run(model, root, "triton", False, prompts, loras, max_tokens, 8)
    tokens, rec, engine = _run(model, root, "triton", True, prompts, loras, max_tokens, 8)
    assert tokens == eager
    for got, want in zip(rec.logits, eager_rec.logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    keys = engine.runner.piecewise._graphs
    assert any(p.lora is not None and p.lora.row_slots is not None for p in keys.values())


def test_many_steps_with_admissions_every_step(tiny_models, tmp_path):
    """The engine with piecewise steps gives the same greedy tokens as without over many steps,
    a request admitted every step (admit_wait_steps=0), prompts chunked by a small budget."""
    model = tiny_models["mha"]
    root = _root(model, tmp_path)
    prompts = _prompts(24)
    loras = [("r8", "r16", None, "attn")[i % 4] for i in range(24)]
    max_tokens = [2 + (5 * i) % 9 for i in range(24)]
    eager, _, _ = _run(model, root, "torch", False, prompts, loras, max_tokens, 16)
    tokens, rec, engine = _run(model, root, "torch", True, prompts, loras, max_tokens, 16)
    assert tokens == eager
    assert engine.runner.piecewise.replays == len(rec.tokens) > 30


def test_token_buckets_and_fits(tiny_models):
    assert token_buckets(24) == (16, 32)
    assert token_buckets(4096)[-1] == 4096 and token_buckets(10**6) == TOKEN_BUCKETS
    # Every 64 tokens up to 1024 by default: a step pads at most 63 tokens there.
    assert token_buckets(1024) == (16, 32, *range(64, 1025, 64))
    assert token_buckets(700, spacing=256) == (16, 32, 64, 128, 256, 512, 768)
    assert token_buckets(1000, spacing=96)[-2:] == (960, 1024)  # 1024 is always a bucket
    engine = Engine(EngineConfig(base_model=str(tiny_models["gqa"]), device=DEVICE,
                                 kernel_backend="torch", pool_pages=16))
    r = engine.runner
    pieces = PiecewiseGraphs(engine.model, r.ops, r.pool, r.kv_shape, 8, 100, capture=False)
    assert pieces.buckets[-1] == 128  # captured up to the bucket that holds 100 tokens,
    assert pieces.fits(100, 8, 2, 16) and not pieces.fits(101, 8, 2, 16)  # used up to 100
    assert not pieces.fits(64, 9, 2, 16) and not pieces.fits(64, 8, 2, 10**4)
    assert pieces.fits(64, 8, MAX_PROMPTS, 16) and not pieces.fits(64, 8, MAX_PROMPTS + 1, 16)


@pytest.mark.parametrize("with_adapter", [False, True])
def test_capture_all_covers_every_bucket(with_adapter, tiny_models):
    engine = Engine(EngineConfig(base_model=str(tiny_models["gqa"]), device=DEVICE,
                                 kernel_backend="torch", pool_pages=16))
    r = engine.runner
    pieces = PiecewiseGraphs(engine.model, r.ops, r.pool, r.kv_shape, 4, 40, capture=False)
    kinds = [(0, None)] + ([(12, frozenset({0, 4}))] if with_adapter else [])
    pieces.capture_all(kinds)
    want = {(t, 0, None) for t in (16, 32, 64)}
    if with_adapter:
        want |= {(t, 16, None) for t in (16, 32, 64)}
    assert set(pieces._graphs) == want


def test_piecewise_memory_estimate():
    """Shared buffers of the largest bucket + every key's LoRA z + one piece's intermediates
    (the profiled peak, scaled up when the largest bucket exceeds the token budget)."""
    from slora_backend.memory import piecewise_graph_bytes
    from slora_backend.model_spec import ModelSpec

    spec = ModelSpec("llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=4, head_dim=16, vocab_size=100, rms_norm_eps=1e-5,
                     max_position_embeddings=64, tie_word_embeddings=False, attention_bias=False)
    est = piecewise_graph_bytes(spec=spec, max_batch=8, max_tokens=24, dtype_bytes=2,
                                max_batched_tokens=24, peak_step_bytes=240)
    shared = 32 * ((64 + 2 * 64 + 2 * 16) * 2 + 28) + 8 * 16
    z = (16 + 32) * 7 * 2 * 2 * (0 + 8 + 16 + 32 + 64 + 128 + 256)
    assert est == shared + z + 240 * 32 // 24


def test_steps_above_piecewise_max_tokens_run_eagerly():
    from slora_backend import EngineConfig
    from slora_backend.piecewise_graphs import token_buckets

    config = EngineConfig(base_model="random:tiny-gqa", piecewise_graphs=True, piecewise_max_tokens=300)
    assert config.piecewise_token_limit == 300
    assert token_buckets(config.piecewise_token_limit)[-1] == 320  # the first bucket holding 300
    assert EngineConfig(base_model="random:tiny-gqa").piecewise_token_limit == 1024  # the default
    unbounded = EngineConfig(base_model="random:tiny-gqa", piecewise_max_tokens=None)
    assert unbounded.piecewise_token_limit == 4096  # None: max_batched_tokens
    with pytest.raises(ValueError, match="piecewise_max_tokens must be >= 1, got 0"):
        EngineConfig(base_model="random:tiny-gqa", piecewise_max_tokens=0)
    for spacing in (0, 8, 24, 2048):
        with pytest.raises(ValueError, match=f"piecewise_bucket_tokens must be a multiple of 16 "
                                             f"from 16 to 1024, got {spacing}"):
            EngineConfig(base_model="random:tiny-gqa", piecewise_bucket_tokens=spacing)
