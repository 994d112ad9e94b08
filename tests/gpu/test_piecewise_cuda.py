"""On CUDA: steps that prefill, replayed from captured piecewise graphs (attention eager between
the pieces), give the eager path's greedy tokens, and transformers + PEFT's. Collected only
where CUDA exists (tests/conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import make_tiny_model
from tests.engine.test_triton_backend import _adapters

pytestmark = pytest.mark.gpu

_PIECEWISE_CHECK = """
import json, sys, torch
from slora_backend import Engine, EngineConfig, SamplingParams
from tests.engine.test_triton_backend import LORAS
model, root, dtype, split = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "split"
splits = []
if split:  # split K into runs of one block (the tiny model's K is 2-3 blocks), count the splits
    import slora_kernels.lora_prefill as prefill
    import slora_kernels.split_k as split_k
    split_k.K_BLOCKS_PER_SPLIT = 1
    def counted(*args, _plan=prefill.plan_splits):
        planned = _plan(*args)
        splits.append(planned[0])
        return planned
    prefill.plan_splits = counted
# A request admitted every step beside the running ones, prompts of many lengths chunked by a
# small token budget: nearly every step prefills, through many token buckets, with padding.
n = 24
prompts = [[100 + (31 * i + 7 * j) % 900 for j in range(3 + (37 * i) % 150)] for i in range(n)]
params = [SamplingParams(max_tokens=4 + (5 * i) % 11, ignore_eos=True) for i in range(n)]
loras = (LORAS * n)[:n]
out = {}
for pieces in (True, False):
    engine = Engine(EngineConfig(base_model=model, adapter_root=root, device="cuda", dtype=dtype,
                                 pool_pages=1024, max_num_seqs=16, max_batched_tokens=96,
                                 admit_wait_steps=0, piecewise_graphs=pieces, split_k_shrink=split))
    done = {}

    def collect(o):
        if o.finished:
            done[o.request_id] = o

    ids = []
    for p, sp, name in zip(prompts, params, loras):
        ids.append(engine.add_request(p, sp, name, on_output=collect))
        engine.step()
    while len(done) < n:
        engine.step()
    torch.cuda.synchronize()
    out[str(pieces)] = [done[i].token_ids for i in ids]
    pw = engine.runner.piecewise
    out[f"replays_{pieces}"] = pw.replays if pw else 0
    out[f"graphs_{pieces}"] = pw.num_graphs if pw else 0
    out[f"keys_{pieces}"] = sorted(str(k) for k in pw._graphs) if pw else []
    out[f"split_launches_{pieces}"] = sum(s > 1 for s in splits)
    splits.clear()
    engine.close()
print(json.dumps(out))
"""


# In a subprocess: a device-side assert would poison the CUDA context of every later test.
@pytest.mark.parametrize("dtype,split", [("float32", ""), ("float16", ""), ("float16", "split")])
def test_piecewise_replay_equals_eager(dtype, split, tmp_path):
    """... and with the segment shrink's K split (split_k.py) in both, eager launches and
    graphs sharing the engine's one workspace."""
    model_dir = make_tiny_model(tmp_path / "bare", "gqa", tokenizer_dir=tmp_path / "none")
    root = _adapters(model_dir, tmp_path / "adapters", scale=0.5)
    run = subprocess.run([sys.executable, "-c", _PIECEWISE_CHECK, str(model_dir), str(root), dtype,
                          split or "-"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["replays_True"] > 20 and out["graphs_True"] > 0, out
    assert out["True"] == out["False"]
    # (the tiny model's K is too short to split by itself)
    assert (out["split_launches_True"] > 0) == (out["split_launches_False"] > 0) == bool(split)


def test_piecewise_tiny_bare_matches_peft_on_cuda(tmp_path):
    """Piecewise graphs with decode graphs, prompts chunked beside decode tokens, against
    transformers + PEFT one prompt at a time (fp32)."""
    from slora_backend import Engine, EngineConfig, SamplingParams
    from tests.conftest import make_adapter
    from tests.engine.peft_reference import PeftReference
    from tests.engine.test_peft_equivalence import ADAPTERS, LORAS, MAX_TOKENS

    model_dir = make_tiny_model(tmp_path / "bare", "gqa", tokenizer_dir=tmp_path / "none")
    root = tmp_path / "adapters"
    paths = {name: make_adapter(model_dir, root / name, seed=i, scale=1.0, **kw)
             for i, (name, kw) in enumerate(ADAPTERS.items())}
    engine = Engine(EngineConfig(base_model=str(model_dir), adapter_root=str(root), device="cuda",
                                 dtype="float32", pool_pages=512, max_batched_tokens=16,
                                 admit_wait_steps=0, piecewise_graphs=True))
    assert engine.runner.piecewise is not None
    prompts = [[100 + (37 * i + 11 * j) % 700 for j in range(3 + 5 * i)] for i in range(len(LORAS))]
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), LORAS)
    assert engine.runner.piecewise.replays > 0
    ref = PeftReference(model_dir, paths)
    for ids, lora, out in zip(prompts, LORAS, outs):
        assert out.token_ids == ref.greedy(ids, lora, MAX_TOKENS), f"adapter {lora}"
