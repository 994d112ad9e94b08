"""Adapter management stays responsive while the engine loop is busy.

The engine thread takes its step lock back to back and Python's locks are not fair, so a call
that needs the same lock could wait for many steps. Registry actions no longer take it; unload
(which must stop steps) is handed the lock between steps. (On the H200 the ensemble's adapter
step, which then resolved every request under the step lock, took 2.2 s per request; on this
CPU the starvation itself did not reproduce, so this test checks the bound, not the old fault.)
"""

from __future__ import annotations

import threading
import time

from slora_backend import Engine, EngineConfig, SamplingParams
from tests.conftest import make_adapter


def test_load_resolve_unload_while_the_engine_is_busy(tiny_models, tmp_path):
    model = tiny_models["gqa"]
    make_adapter(model, tmp_path / "a", 4, ["q_proj"], 4)
    make_adapter(model, tmp_path / "b", 4, ["v_proj"], 4, seed=1)
    engine = Engine(EngineConfig(base_model=str(model), adapter_root=str(tmp_path),
                                 max_model_len=512))
    engine.load_adapter("a", "a")
    # Make each step hold the lock the way a GPU step does: mostly waiting with the GIL
    # released (here in sleep, there in the device sync), free only for a moment in between.
    execute = engine.runner.execute

    def gpu_like_execute(*args, **kwargs):
        time.sleep(0.01)
        return execute(*args, **kwargs)

    engine.runner.execute = gpu_like_execute
    finished = threading.Event()
    busy = SamplingParams(max_tokens=150, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"busy {i}", busy, on_output=lambda o: o.finished and finished.set())
    engine.start()
    try:
        while engine.steps < 3:
            time.sleep(0.005)
        assert engine.resolve_adapter("b").ranks == {"v_proj": 4}  # loaded from the root
        before = engine.steps
        engine.unload_adapter("a")
        # The unload waited for at most the step in flight, not for the work to run out.
        assert engine.steps - before <= 2
        assert not finished.is_set()
        assert sorted(a.name for a in engine.list_adapters()) == ["b"]
    finally:
        engine.stop()
    assert engine.pool.used_by["kv"] == 0
