"""On CUDA: the engine on the compiled Triton kernels gives the
torch backend's greedy tokens on SmolLM2-135M in fp32, with mixed adapters. Collected only where
CUDA exists (tests/conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.engine.test_triton_backend import _adapters, _tokens


def test_triton_backend_matches_torch_on_smollm2_cuda(smollm2, tmp_path):
    root = _adapters(smollm2, tmp_path, scale=0.5)
    assert _tokens(smollm2, root, "triton", 16) == _tokens(smollm2, root, "torch", 16)


_GRAPH_CHECK = """
import json, sys
from slora_backend import Engine, EngineConfig, SamplingParams
from tests.engine.test_triton_backend import LORAS, PROMPTS
model, root, copies = sys.argv[1], sys.argv[2], int(sys.argv[3])
# Prompts of growing length, so that contexts cross the 256-token graph bucket, and answers of
# different lengths, so that the decode batch shrinks through several batch buckets.
prompts = [p + " and so on" * (7 * i) for i, p in enumerate(PROMPTS * copies)]
params = [SamplingParams(max_tokens=8 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
out = {}
for graphs in (True, False):
    engine = Engine(EngineConfig(base_model=model, adapter_root=root, device="cuda",
                                 dtype="float32", cuda_graphs=graphs, pool_pages=1024))
    out[str(graphs)] = [o.token_ids for o in engine.generate(prompts, params, LORAS * copies)]
    out[f"graphs_{graphs}"] = engine.runner.graphs.num_graphs if engine.runner.graphs else 0
print(json.dumps(out))
"""


# In a subprocess: a device-side assert would poison the CUDA context of every later test.
@pytest.mark.parametrize("model", ["smollm2", "tiny_gqa"])
def test_graph_replay_equals_eager(model, smollm2, tiny_models, tmp_path):
    model_dir = smollm2 if model == "smollm2" else tiny_models["gqa"]
    root = _adapters(model_dir, tmp_path, scale=0.5)
    copies = 3 if model == "smollm2" else 5  # 12 and 20 sequences: padded to buckets 16 and 24
    run = subprocess.run([sys.executable, "-c", _GRAPH_CHECK, str(model_dir), str(root),
                          str(copies)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["graphs_True"] >= 4  # several (batch, rank, context) buckets were captured
    assert out["True"] == out["False"]
