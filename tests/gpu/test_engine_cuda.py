"""On CUDA: the engine on the compiled Triton kernels gives the
torch backend's greedy tokens on SmolLM2-135M in fp32, with mixed adapters. Collected only where
CUDA exists (tests/conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import make_tiny_model
from tests.engine.test_triton_backend import _adapters, _tokens


def test_triton_backend_matches_torch_on_smollm2_cuda(smollm2, tmp_path):
    root = _adapters(smollm2, tmp_path, scale=0.5)
    assert _tokens(smollm2, root, "triton", 16) == _tokens(smollm2, root, "torch", 16)


_GRAPH_CHECK = """
import json, sys
from slora_backend import Engine, EngineConfig, SamplingParams
from tests.engine.test_triton_backend import LORAS
model, root, copies, overlap = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "overlap"
# Token-id prompts (a model without a tokenizer works too) of growing length, so that contexts
# cross the 256-token graph bucket, and answers of different lengths, so that the decode batch
# shrinks through several batch buckets.
n = len(LORAS) * copies
prompts = [[100 + (31 * i + 7 * j) % 900 for j in range(4 + 300 * i // n)] for i in range(n)]
params = [SamplingParams(max_tokens=8 + 3 * i, ignore_eos=True) for i in range(n)]
out = {}
# With "overlap": the graphs (and the steps that prefill) run each shrink on a side stream,
# the eager engine in line, so a shrink read or overwritten out of order shows as a difference.
for graphs in (True, False):
    engine = Engine(EngineConfig(base_model=model, adapter_root=root, device="cuda",
                                 dtype="float32", cuda_graphs=graphs, pool_pages=1024,
                                 overlap_lora_shrink=overlap and graphs))
    out[str(graphs)] = [o.token_ids for o in engine.generate(prompts, params, LORAS * copies)]
    out[f"graphs_{graphs}"] = engine.runner.graphs.num_graphs if engine.runner.graphs else 0
    out[f"side_{graphs}"] = engine.runner.ops.shrink_stream is not None
print(json.dumps(out))
"""


# In a subprocess: a device-side assert would poison the CUDA context of every later test.
# "tiny_bare" is the tiny GQA model without a tokenizer, so it needs no SmolLM2 files (the H200
# machine has none); the tiny model with SmolLM2's tokenizer would check nothing more here.
# On Hopper the decode LoRA expand is a programmatic dependent launch of the shrink: these
# replays check that the captured graphs keep its wait on z.
@pytest.mark.parametrize("model,overlap", [("smollm2", ""), ("tiny_bare", ""),
                                           ("tiny_bare", "overlap")])
def test_graph_replay_equals_eager(model, overlap, request, tmp_path):
    if model == "tiny_bare":
        model_dir = make_tiny_model(tmp_path / "bare", "gqa", tokenizer_dir=tmp_path / "none")
    else:
        model_dir = request.getfixturevalue("smollm2")
    root = _adapters(model_dir, tmp_path / "adapters", scale=0.5)
    copies = 3 if model == "smollm2" else 5  # 12 and 20 sequences: padded to buckets 16 and 24
    run = subprocess.run([sys.executable, "-c", _GRAPH_CHECK, str(model_dir), str(root),
                          str(copies), overlap or "-"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["graphs_True"] >= 4  # several (batch, rank, context) buckets were captured
    assert out["side_True"] == bool(overlap) and not out["side_False"]
    assert out["True"] == out["False"]


def test_tiny_bare_matches_peft_on_cuda(tmp_path):
    """The whole CUDA path - Triton kernels, decode graphs, device LoRA tables, each step built
    while the one before runs (its tokens patched in on the device) - against transformers +
    PEFT, one prompt at a time, on a model needing no downloaded files (fp32)."""
    from slora_backend import Engine, EngineConfig, SamplingParams
    from tests.conftest import make_adapter
    from tests.engine.peft_reference import PeftReference
    from tests.engine.test_peft_equivalence import ADAPTERS, LORAS, MAX_TOKENS

    model_dir = make_tiny_model(tmp_path / "bare", "gqa", tokenizer_dir=tmp_path / "none")
    root = tmp_path / "adapters"
    paths = {name: make_adapter(model_dir, root / name, seed=i, scale=1.0, **kw)
             for i, (name, kw) in enumerate(ADAPTERS.items())}
    engine = Engine(EngineConfig(base_model=str(model_dir), adapter_root=str(root),
                                 device="cuda", dtype="float32", pool_pages=512))
    assert engine.runner.graphs is not None and engine.runner.slot_tables is not None
    prompts = [[100 + (37 * i + 11 * j) % 700 for j in range(3 + 5 * i)] for i in range(len(LORAS))]
    before, start = engine.stats(), time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), LORAS)
    wall, stats = time.perf_counter() - start, engine.stats()
    assert engine.runner.graphs.replays > 0
    # the device's account (step_clock.DeviceClock): decode-graph steps and steps that prefill
    # took device time, and spans plus gaps between steps fit in the time that passed
    spans = {k: getattr(stats, f"device_seconds_{k}") - getattr(before, f"device_seconds_{k}")
             for k in ("graph", "piecewise", "eager")}
    idle = stats.device_idle_between_steps - before.device_idle_between_steps
    assert spans["graph"] > 0 and spans["piecewise"] + spans["eager"] > 0 and idle >= 0
    assert sum(spans.values()) + idle <= wall
    ref = PeftReference(model_dir, paths)
    for ids, lora, out in zip(prompts, LORAS, outs):
        assert out.token_ids == ref.greedy(ids, lora, MAX_TOKENS), f"adapter {lora}"
