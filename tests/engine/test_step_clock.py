"""The engine's time account by kind of step (``slora_backend.step_clock``)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from benchmarks.metrics import stats_delta
from slora_backend import Engine, EngineConfig, SamplingParams
from slora_backend.adapters.copier import AdapterCopier
from slora_backend.step_clock import CopyClock, DeviceClock, StepClock, step_kind
from tests.conftest import make_adapter


def test_step_kind_follows_which_replay_counter_moved():
    assert step_kind((3, 5), (4, 5)) == "graph"
    assert step_kind((3, 5), (3, 6)) == "piecewise"
    assert step_kind((3, 5), (3, 5)) == "eager"


def test_a_step_charges_its_kinds_and_the_rest_to_other():
    clock = StepClock()
    start = time.perf_counter()
    with clock.step():
        with clock.charging("graph"):
            time.sleep(0.02)
        launched = time.perf_counter()
        time.sleep(0.01)
        clock.add("eager", time.perf_counter() - launched)  # as StepLauncher charges a launch
        time.sleep(0.03)
    wall = time.perf_counter() - start
    assert clock.seconds["graph"] >= 0.02 and clock.seconds["eager"] >= 0.01
    assert clock.seconds["piecewise"] == 0.0
    # other = the step's time less what was charged inside it: the last sleep and bookkeeping
    assert clock.seconds["other"] >= 0.03
    assert abs(sum(clock.seconds.values()) - wall) < 1e-3
    with pytest.raises(KeyError):
        clock.add("decode", 1.0)  # not a kind: refused rather than silently counted


class FakeEvent:
    """A completed timing event at ``ms`` on one stream's timeline."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def elapsed_time(self, end: FakeEvent) -> float:
        return end.ms - self.ms


def test_device_clock_sums_spans_by_kind_and_the_gaps_between_steps():
    """Steps on one stream: a graph step 0-10 ms, a piecewise step launched late (15-40 ms: a
    5 ms gap), an eager step queued behind it (its start event ran at 40 ms: no gap); a step
    without events (off CUDA) adds nothing; after the engine ran dry, the wait for work before
    the next step (100-300 ms) is no gap."""
    clock = DeviceClock()
    steps = [SimpleNamespace(kind="graph", started=FakeEvent(0), done=FakeEvent(10)),
             SimpleNamespace(kind="piecewise", started=FakeEvent(15), done=FakeEvent(40)),
             SimpleNamespace(kind="eager", started=FakeEvent(40), done=FakeEvent(100)),
             SimpleNamespace(kind="eager", started=None, done=None)]
    for step in steps:
        clock.finished(step)
    assert clock.seconds == pytest.approx({"graph": 0.010, "piecewise": 0.025, "eager": 0.060})
    assert clock.idle_between_steps == pytest.approx(0.005)
    clock.drained()
    clock.finished(SimpleNamespace(kind="graph", started=FakeEvent(300), done=FakeEvent(310)))
    assert clock.seconds["graph"] == pytest.approx(0.020)
    assert clock.idle_between_steps == pytest.approx(0.005)


def test_engine_stats_account_for_the_steps_it_ran():
    with Engine(EngineConfig(base_model="random:tiny-gqa", pool_pages=64)) as engine:
        before = engine.stats().to_dict()
        start = time.perf_counter()
        outs = engine.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=6, ignore_eos=True))
        wall = time.perf_counter() - start
        after = engine.stats().to_dict()
    assert [len(o.token_ids) for o in outs] == [6, 6]
    delta = stats_delta(before, after)
    # on the CPU there are no graphs: every step ran eagerly, launched and then waited for
    assert delta["steps"] >= 6 and delta["eager_steps"] == delta["steps"]
    assert delta["step_seconds_graph"] == delta["step_seconds_piecewise"] == 0
    assert delta["step_seconds_eager"] > 0 and delta["step_seconds_other"] > 0
    charged = sum(delta[f"step_seconds_{k}"] for k in ("graph", "piecewise", "eager", "other"))
    assert charged <= wall + 1e-3  # the account never exceeds the time that passed
    # the device's side needs CUDA events: zero here, but in the stats and their deltas
    device = [k for k in delta if k.startswith("device_")]
    assert sorted(device) == ["device_idle_between_steps", "device_seconds_eager",
                              "device_seconds_graph", "device_seconds_piecewise"]
    assert all(delta[k] == 0 for k in device)


class FakeCopyEvent(FakeEvent):
    def __init__(self, ms: float, done: bool = True) -> None:
        super().__init__(ms)
        self.done = done

    def query(self) -> bool:
        return self.done


def test_copy_clock_counts_a_copy_once_its_end_has_passed():
    clock = CopyClock()
    assert clock.begin(None) is None  # off CUDA: no events, nothing counted
    clock.end(None, None)
    late = FakeCopyEvent(9, done=False)
    clock.end(FakeEvent(0), FakeCopyEvent(2))
    clock.end(FakeEvent(5), late)
    assert clock.seconds == pytest.approx(0.002)
    late.done = True
    assert clock.seconds == pytest.approx(0.006)
    assert clock.seconds == pytest.approx(0.006)  # each span counted once


def test_copy_clock_holds_only_the_copies_in_flight():
    """Unread (a TP worker's runner, a server nobody scrapes), the clock still counts and drops
    finished copies as new ones come: it never grows with the number of copies served."""
    clock = CopyClock()
    for i in range(1000):
        clock.end(FakeEvent(i), FakeCopyEvent(i + 0.5))
    pending = FakeCopyEvent(2000, done=False)
    clock.end(FakeEvent(1999), pending)
    clock.end(FakeEvent(2001), FakeCopyEvent(2002))  # done, but behind one in flight
    assert len(clock._open) == 2
    pending.done = True
    assert clock.seconds == pytest.approx(1000 * 0.0005 + 0.001 + 0.001)
    assert clock._open == []


def test_copier_times_its_thread_and_the_engine_threads_wait():
    """On a helper thread, a copy's own time is the copier's; a step that waits for a copy
    not queued yet blocks the engine thread, and that wait is counted too."""
    def slow_copy(resident, after):
        time.sleep(0.05)

    copier = AdapterCopier(slow_copy, lambda name, reason: None, background=True)
    copier.submit([SimpleNamespace(name="a")])
    copier.wait(["a"])
    assert copier.host_seconds >= 0.05
    assert 0.03 <= copier.wait_seconds <= copier.host_seconds + 0.01
    copier.wait(["a"])  # done: no further wait
    assert copier.wait_seconds <= copier.host_seconds + 0.01


def test_engine_stats_count_adapter_copies(tiny_models, tmp_path):
    """The copies of a served adapter show in the stats: the copy thread's seconds (here the
    engine thread runs them: no CUDA side stream), no device seconds off CUDA."""
    root = tmp_path / "adapters"
    make_adapter(tiny_models["gqa"], root / "a", 8, ["q_proj", "v_proj"], 16, seed=1)
    with Engine(EngineConfig(base_model=str(tiny_models["gqa"]), adapter_root=str(root),
                             pool_pages=64)) as engine:
        before = engine.stats().to_dict()
        engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True), ["a"])
        after = engine.stats().to_dict()
        copied_s = engine.adapters.copier.host_seconds
    delta = stats_delta(before, after)
    assert delta["adapter_loads"] == 1
    assert before["adapter_copy_host_seconds"] == 0 < copied_s  # (a tiny model: well under 1 ms)
    assert after["adapter_copy_host_seconds"] == round(copied_s, 4)
    assert delta["adapter_copy_wait_seconds"] == delta["adapter_copy_device_seconds"] == 0
