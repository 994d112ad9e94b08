"""On CUDA: the default sizing (gpu_memory_utilization of the device's total memory, the pool
what is left after weights, a profiled step, graphs and per-page tables) serves any model size;
two engines share one GPU; close() gives the memory back. Collected only where CUDA exists."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import make_tiny_model

pytestmark = pytest.mark.gpu

_TWO_ENGINES = """
import json, sys, torch
from slora_backend import Engine, EngineConfig, SamplingParams
model = sys.argv[1]
torch.cuda.init()
torch.cuda.mem_get_info()  # (the CUDA context exists before the first measurement)
before = torch.cuda.mem_get_info()[0]
cfg = dict(base_model=model, device="cuda", dtype="float32", gpu_memory_utilization=0.45)
prompts = [[100 + 7 * i + j for j in range(5 + i)] for i in range(8)]
params = SamplingParams(max_tokens=12, ignore_eos=True)
out = {}
with Engine(EngineConfig(**cfg)) as first:
    second = Engine(EngineConfig(**cfg))
    out["pages"] = [first.pool.num_pages, second.pool.num_pages]
    a = [o.token_ids for o in first.generate(prompts, params)]
    b = [o.token_ids for o in second.generate(prompts, params)]
    out["same"] = a == b and all(len(t) == 12 for t in a)
    second.close()
    # a share larger than what the first engine left free is refused, naming the numbers
    free, total = torch.cuda.mem_get_info()
    too_much = round(min(0.99, free / total + 0.05), 2)
    try:
        Engine(EngineConfig(**{**cfg, "gpu_memory_utilization": too_much}))
        out["refused"] = ""
    except ValueError as e:
        out["refused"] = str(e)
    out["too_much"] = too_much
out["freed_gib"] = (before - torch.cuda.mem_get_info()[0]) / 2**30
print(json.dumps(out))
"""


def test_two_engines_share_one_gpu_and_close_gives_memory_back(tmp_path):
    model = make_tiny_model(tmp_path / "bare", "gqa", tokenizer_dir=tmp_path / "none")
    run = subprocess.run([sys.executable, "-c", _TWO_ENGINES, str(model)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert min(out["pages"]) > 0 and out["same"]
    assert f"gpu_memory_utilization {out['too_much']} asks for" in out["refused"]
    assert abs(out["freed_gib"]) < 1.0


def _default_config_matches_peft(model_dir, root):
    from slora_backend import Engine, EngineConfig, SamplingParams
    from tests.conftest import make_adapter
    from tests.engine.peft_reference import PeftReference
    from tests.engine.test_peft_equivalence import ADAPTERS, LORAS, MAX_TOKENS

    paths = {name: make_adapter(model_dir, root / name, seed=i, scale=1.0, **kw)
             for i, (name, kw) in enumerate(ADAPTERS.items())}
    with Engine(EngineConfig(base_model=str(model_dir), adapter_root=str(root), device="cuda",
                             dtype="float32")) as engine:  # no pool_pages: the default sizing
        prompts = [[100 + (37 * i + 11 * j) % 700 for j in range(3 + 5 * i)]
                   for i in range(len(LORAS))]
        outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), LORAS)
    ref = PeftReference(model_dir, paths)
    for ids, lora, out in zip(prompts, LORAS, outs):
        assert out.token_ids == ref.greedy(ids, lora, MAX_TOKENS), f"adapter {lora}"


def test_tiny_model_default_config_matches_peft(tmp_path):
    model_dir = make_tiny_model(tmp_path / "bare", "gqa", tokenizer_dir=tmp_path / "none")
    _default_config_matches_peft(model_dir, tmp_path / "adapters")


def test_smollm2_default_config_matches_peft(smollm2, tmp_path):
    _default_config_matches_peft(smollm2, tmp_path / "adapters")
