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
model, root = sys.argv[1], sys.argv[2]
params = SamplingParams(max_tokens=24, ignore_eos=True)
out = {}
for graphs in (True, False):
    engine = Engine(EngineConfig(base_model=model, adapter_root=root, device="cuda",
                                 dtype="float32", cuda_graphs=graphs, pool_pages=512))
    out[str(graphs)] = [o.token_ids for o in engine.generate(PROMPTS * 3, params, LORAS * 3)]
print(json.dumps(out))
"""


# Known bug (docs/benchmarks.md): on the H200 (torch 2.11, triton 3.6) replaying a captured decode
# graph trips a device-side "index out of bounds" assert in a torch gather, while the same padded
# inputs run eagerly are correct (tests/engine/test_graph_padding.py, and on CUDA too). Graphs are
# therefore off by default. strict: this test fails loudly once the capture is fixed. It runs in a
# subprocess because a device assert poisons the CUDA context for every later test.
@pytest.mark.xfail(strict=True, reason="CUDA-graph replay hits a device assert (see docs/benchmarks.md)")
def test_graph_replay_equals_eager(smollm2, tmp_path):
    root = _adapters(smollm2, tmp_path, scale=0.5)
    run = subprocess.run([sys.executable, "-c", _GRAPH_CHECK, str(smollm2), str(root)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["True"] == out["False"]
