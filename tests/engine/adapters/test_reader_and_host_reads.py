"""Packed adapter rows read by one gather (adapters/reader.py) equal a row-by-row reference."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks.adapter_sets import model_spec
from benchmarks.synthetic_adapters import write_random_adapter
from slora_backend.adapters.host_store import AdapterStore
from slora_backend.adapters.reader import LORA_KEY
from slora_backend.errors import AdapterLoadError
from slora_backend.layout import PoolLayout

SPEC = model_spec("random:tiny-gqa")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def reference_pack(path, plan, dtype):
    """Row by row, layer by layer: A row j, or column j of B (= row j of B^T)."""
    tensors = {}
    for key, t in load_file(path / "adapter_model.safetensors").items():
        m = LORA_KEY.match(key)
        tensors[(int(m.group(1)), m.group(2), m.group(3))] = t
    rows = []
    for layer in range(SPEC.num_layers):
        parts = [tensors[(layer, r.module, "A")][r.index] if r.kind == "a"
                 else tensors[(layer, r.module, "B")][:, r.index] for r in plan.rows]
        rows.append(torch.cat(parts).to(dtype))
    return torch.stack(rows)


@pytest.mark.parametrize("rank, targets, file_dtype", [
    (8, ["q_proj", "v_proj", "down_proj"], torch.float16),
    (16, ALL, torch.float32),
    (4, ["o_proj", "up_proj"], torch.bfloat16),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_packed_rows_equal_the_reference(tmp_path, rank, targets, file_dtype, dtype):
    path = write_random_adapter(tmp_path / "a", SPEC, rank, targets, seed=rank, dtype=file_dtype)
    store = AdapterStore(PoolLayout(SPEC, 4), dtype, 1 << 30, False)
    entry = store.register("a", path)
    assert torch.equal(store.weights("a"), reference_pack(path, entry.plan, dtype))


def test_mixed_dtypes_in_one_file(tmp_path):
    path = write_random_adapter(tmp_path / "a", SPEC, 8, ALL, seed=3)
    tensors = load_file(path / "adapter_model.safetensors")
    for i, key in enumerate(sorted(tensors)):  # every third tensor in fp32, one in bf16
        tensors[key] = tensors[key].float() if i % 3 == 0 else tensors[key]
    tensors[key] = tensors[key].bfloat16()
    save_file(tensors, path / "adapter_model.safetensors")
    store = AdapterStore(PoolLayout(SPEC, 4), torch.float32, 1 << 30, False)
    entry = store.register("a", path)
    assert torch.equal(store.weights("a"), reference_pack(path, entry.plan, torch.float32))


def test_file_damaged_after_registration_is_a_load_error(tmp_path):
    path = write_random_adapter(tmp_path / "a", SPEC, 8, ALL, seed=4)
    store = AdapterStore(PoolLayout(SPEC, 4), torch.float32, 1 << 30, False)
    store.register("a", path)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterLoadError, match="cannot read weights"):
        store.weights("a")


def test_host_reads_start_once_report_failures_once_and_retry(tmp_path):
    import time

    from slora_backend.adapters.host_reads import HostReads

    good = write_random_adapter(tmp_path / "good", SPEC, 8, ALL, seed=5)
    bad = write_random_adapter(tmp_path / "bad", SPEC, 8, ALL, seed=6)
    store = AdapterStore(PoolLayout(SPEC, 4), torch.float32, 1 << 30, False)
    store.register("good", good)
    store.register("bad", bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    reads = HostReads(store, workers=2)
    assert reads.ready("nobody")  # unregistered: admitted, its step reports it
    assert not reads.ready("good") and not reads.ready("bad")  # reads started
    deadline = time.monotonic() + 30
    while reads.busy:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert reads.ready("good") and store.has_weights("good")
    assert not reads.ready("bad")  # failed: not retried until the failure is taken
    failures = reads.take_failures()
    assert list(failures) == ["bad"] and "cannot read weights" in failures["bad"]
    assert reads.take_failures() == {}
    assert not reads.ready("bad")  # read again: the file may have been repaired meanwhile
    while reads.busy:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert list(reads.take_failures()) == ["bad"]  # it was not
    reads.shutdown()


def test_preload_reads_in_order_within_the_host_budget(tmp_path):
    from slora_backend.adapters.host_reads import HostReads

    names = [f"a{i}" for i in range(5)]
    store = AdapterStore(PoolLayout(SPEC, 4), torch.float32, 1 << 30, False)
    for i, name in enumerate(names):
        store.register(name, write_random_adapter(tmp_path / name, SPEC, 8, ALL, seed=i))
    size = store.get("a0").size_bytes
    store.host_budget_bytes = 3 * size + size // 2  # room for three
    reads = HostReads(store, workers=2)
    reads.preload(names)
    assert reads.wait_preloads(30)
    assert [n for n in names if store.has_weights(n)] == ["a0", "a1", "a2"]
    assert store.host_bytes == 3 * size  # nothing was read only to be dropped again
    assert store.disk_loads == 3
    # A request's own read is not limited by preloading: the store makes room as usual.
    assert not reads.ready("a4")
    reads.preload(["a3"])  # the budget is full again once a4 is in: skipped
    assert reads.wait_preloads(30)
    reads.shutdown()
    assert store.has_weights("a4") and not store.has_weights("a3")
    assert reads.wait_preloads(0)


def test_engine_preloads_registered_adapters(tmp_path, tiny_models):
    from slora_backend import Engine, EngineConfig, SamplingParams
    from tests.conftest import make_adapter

    model = tiny_models["gqa"]
    root = tmp_path / "adapters"
    paths = {n: make_adapter(model, root / n, 4, ["q_proj", "v_proj"], 8, seed=i)
             for i, n in enumerate(("x", "y"))}
    engine = Engine(EngineConfig(base_model=str(model), adapter_root=str(root), device="cpu",
                                 dtype="float32", pool_pages=256, preload_adapters=True))
    for name, path in paths.items():
        engine.load_adapter(name, str(path))
    assert engine.adapters.reads.wait_preloads(30)
    assert engine.adapters.store.num_in_host == 2 and engine.adapters.store.disk_loads == 2
    out = engine.generate([[5, 6, 7]], [SamplingParams(max_tokens=4)], ["y"])
    assert len(out[0].token_ids) == 4
    assert engine.adapters.store.disk_loads == 2  # the request found its adapter in host memory


def test_offline_generate_reads_adapters_first_and_runs_the_batch_as_one(tmp_path, tiny_models,
                                                                         monkeypatch):
    """The scheduler passes over requests whose adapter is still being read; a batch handed to
    generate() must not start in waves because of that: with slow reads (0.3 s each), every
    prompt still prefills in the first step, so the batch takes as many steps as one request."""
    import time

    from slora_backend import Engine, EngineConfig, SamplingParams
    from tests.engine.test_triton_backend import _adapters

    root = _adapters(tiny_models["gqa"], tmp_path / "adapters")
    engine = Engine(EngineConfig(base_model=str(tiny_models["gqa"]), adapter_root=str(root),
                                 kernel_backend="torch", pool_pages=256))
    read = AdapterStore._read_weights

    def slow_read(self, entry):
        time.sleep(0.3)
        return read(self, entry)

    monkeypatch.setattr(AdapterStore, "_read_weights", slow_read)
    prompts = [[5 + i, 6 + i, 7 + i] for i in range(6)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True),
                           ["r8", "r16", None, "r16", "r8", None])
    assert [len(o.token_ids) for o in outs] == [4] * 6
    one = engine.steps
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True), ["r8"])
    assert one == engine.steps - one  # the batch of 6 took the steps of a single request
    engine.close()


def test_reader_threads_run_torch_on_one_thread(tmp_path, tiny_models, monkeypatch):
    """Each reader thread with an OpenMP team the size of the machine left the engine thread's
    steps at half speed on 2 cores (make bench-cpu): readers run torch on one thread, and the
    caller keeps its own setting."""
    from slora_backend import Engine, EngineConfig
    from tests.engine.test_triton_backend import _adapters

    root = _adapters(tiny_models["gqa"], tmp_path / "adapters")
    engine = Engine(EngineConfig(base_model=str(tiny_models["gqa"]), adapter_root=str(root),
                                 kernel_backend="torch", pool_pages=256))
    seen = []
    read = AdapterStore._read_weights

    def recording_read(self, entry):
        seen.append(torch.get_num_threads())
        return read(self, entry)

    monkeypatch.setattr(AdapterStore, "_read_weights", recording_read)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # (as on a 2-core machine; CI runs with OMP_NUM_THREADS=1)
    try:
        engine.adapters.read_ahead(["r8", "r16"])
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        engine.close()
