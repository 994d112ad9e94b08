"""The launcher's engine config file and its validation, the admin token, the engine supervisor's
restart rules, and the adapter model's stub staying free of torch - without a server."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from slora_backend.launcher import SOURCE_REPOSITORY, ServeOptions, write_repository
from slora_backend.launcher.cli import options_from_args, parse_args
from slora_backend.launcher.options import json_value
from slora_backend.serving import AdminToken, EngineProcessError, EngineSupervisor, ServingError
from slora_backend.serving.engine_json import engine_json_path, read_engine_json
from slora_backend.serving.settings import settings_from_json

# ---- engine.json ------------------------------------------------------------------------------


def test_write_repository(tmp_path):
    repo = write_repository(tmp_path / "repo", {"base_model": "/models/x", "device": "cpu"})
    engine = read_engine_json(engine_json_path(repo))
    assert engine["base_model"] == "/models/x" and engine["device"] == "cpu"
    assert engine["adapter_root"] == "demo_adapters"  # keys the flags do not set keep the source's
    assert (repo / "slora" / "1").is_dir() and (repo / "slora_engine" / "1" / "model.py").is_file()
    for model in ("slora_engine", "slora_adapters"):  # no settings left in config.pbtxt
        assert "parameters [" not in (repo / model / "config.pbtxt").read_text()
    # The committed repository itself is untouched.
    assert read_engine_json(engine_json_path(SOURCE_REPOSITORY))["base_model"] == "smollm2"


def test_write_repository_keeps_values_as_given_and_adds_new_keys(tmp_path):
    repo = write_repository(tmp_path / "repo", {"tokenizer": 'say "hi"', "block_tokens": 32,
                                                "adapter_root": "/p\\q"})
    engine = read_engine_json(engine_json_path(repo))
    assert engine["tokenizer"] == 'say "hi"' and engine["adapter_root"] == "/p\\q"
    assert engine["block_tokens"] == 32 and engine["stream_interval"] == 1


def test_flags_reach_engine_json_typed(tmp_path):
    args = parse_args(["--base-model", "random:tiny-gqa", "--adapter-root", str(tmp_path / "ad"),
                       "--kernel-backend", "torch", "--pool-pages", "64", "--tensor-parallel-size", "2",
                       "--engine-param", "engine_process=false", "--engine-param", "seed=7",
                       "--engine-param", "lora_ops=bmm"])
    settings = options_from_args(args).engine_settings()
    assert settings["kernel_backend"] == "torch" and settings["pool_pages"] == 64
    assert settings["engine_process"] is False and settings["seed"] == 7
    assert settings["lora_ops"] == "bmm" and settings["max_num_seqs"] is None
    assert settings["tensor_parallel_size"] == 2
    repo = write_repository(tmp_path / "repo", settings)
    parsed = settings_from_json(read_engine_json(engine_json_path(repo)), tmp_path)
    assert parsed.engine.kernel_backend == "torch" and parsed.engine.pool_pages == 64
    assert parsed.engine_process is False and parsed.engine.adapter_root == str(tmp_path / "ad")
    assert parsed.engine.tensor_parallel_size == 2
    # without the flag: null, the engine's default of one device
    default = settings_from_json(options_from_args(parse_args(
        ["--base-model", "random:tiny-gqa"])).engine_settings(), tmp_path)
    assert default.engine.tensor_parallel_size == 1
    assert [json_value(v) for v in ("32", "null", "x y", "0.5")] == [32, None, "x y", 0.5]


def test_settings_from_json(tmp_path):
    s = settings_from_json({"base_model": "random:tiny-gqa", "adapter_root": "ad",
                            "pool_pages": 64, "max_num_seqs": None, "pin_host_memory": False,
                            "device": "auto", "dtype": "auto", "max_tokens_limit": 50}, tmp_path)
    assert s.engine.base_model == "random:tiny-gqa" and s.engine.pool_pages == 64
    assert s.engine.adapter_root == str(tmp_path / "ad") and s.engine.pin_host_memory is False
    assert s.engine.device == "cpu" and s.engine.dtype == "float32"
    assert s.max_tokens_limit == 50 and s.metrics_interval_s == 0.5 and s.stream_interval == 1
    assert s.engine_process is True and s.engine_restarts == 3
    assert settings_from_json({"base_model": "random:tiny-gqa", "stream_interval": 4},
                              tmp_path).stream_interval == 4
    for bad, match in ((0, "'stream_interval' must be >= 1, got 0"),
                       ("four", "'stream_interval' must be an integer or null, got 'four'")):
        with pytest.raises(ValueError, match=match):
            settings_from_json({"base_model": "random:tiny-gqa", "stream_interval": bad}, tmp_path)
    with pytest.raises(ValueError, match="unknown keys \\['pool_page'\\]"):
        settings_from_json({"base_model": "random:tiny-gqa", "pool_page": 1}, tmp_path)
    with pytest.raises(ValueError, match="'pool_pages' must be an integer or null, got 'many'"):
        settings_from_json({"base_model": "random:tiny-gqa", "pool_pages": "many"}, tmp_path)
    with pytest.raises(ValueError, match="'engine_process' must be true or false or null, got 'no'"):
        settings_from_json({"base_model": "random:tiny-gqa", "engine_process": "no"}, tmp_path)
    with pytest.raises(ValueError, match="'engine_restarts' must be >= 0, got -1"):
        settings_from_json({"base_model": "random:tiny-gqa", "engine_restarts": -1}, tmp_path)
    with pytest.raises(ValueError, match="engine.json: .*kernel_backend"):
        settings_from_json({"base_model": "random:tiny-gqa", "kernel_backend": "cuda"}, tmp_path)


def test_committed_engine_json_is_valid(tmp_path, monkeypatch):
    data = read_engine_json(engine_json_path(SOURCE_REPOSITORY))
    data["base_model"] = "random:tiny-gqa"  # the default would convert SmolLM2
    s = settings_from_json(data, SOURCE_REPOSITORY.parent)
    assert s.engine.adapter_root == str(SOURCE_REPOSITORY.parent / "demo_adapters")


def test_engine_json_file_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="engine.json: the engine config file is missing"):
        read_engine_json(tmp_path / "engine.json")
    (tmp_path / "engine.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold one JSON object"):
        read_engine_json(tmp_path / "engine.json")
    (tmp_path / "engine.json").write_text("{'a': 1}")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_engine_json(tmp_path / "engine.json")


# ---- the admin token ----------------------------------------------------------------------------


def _get(**values):
    arrays = {k: np.array([v.encode()], dtype=np.object_) for k, v in values.items()}
    return arrays.get


def test_admin_token_guards_management_actions_only():
    open_server = AdminToken.from_environment({})
    open_server.check("load", _get())  # no token set: open
    guard = AdminToken.from_environment({"SLORA_ADMIN_TOKEN": "s3cret"})
    for action in ("load", "unload", "abort"):
        with pytest.raises(ServingError, match=f"action '{action}' is restricted on this server: "
                                               "send the admin token in the input 'admin_token' "
                                               r"\(the request has none\)") as e:
            guard.check(action, _get())
        assert e.value.code == "UNAVAILABLE"
        with pytest.raises(ServingError, match="'admin_token' is not the admin token"):
            guard.check(action, _get(admin_token="guess"))
        guard.check(action, _get(admin_token="s3cret"))
    for action in ("list", "describe", "resolve", "stats"):
        guard.check(action, _get())


def test_launcher_admin_token_flag_and_environment(monkeypatch):
    monkeypatch.setenv("SLORA_ADMIN_TOKEN", "from-env")
    assert options_from_args(parse_args([])).admin_token == "from-env"
    assert options_from_args(parse_args(["--admin-token", "flag"])).admin_token == "flag"
    monkeypatch.delenv("SLORA_ADMIN_TOKEN")
    assert options_from_args(parse_args([])).admin_token is None
    assert ServeOptions().admin_token is None


# ---- the engine supervisor ------------------------------------------------------------------------


class FakeProcess:
    """Stands in for EngineProcess: ``die()`` calls on_exit as its reader thread would."""

    started: list[FakeProcess] = []

    def __init__(self, config, on_exit) -> None:
        self.on_exit = on_exit
        self.max_model_len, self.tokenizer, self.pid = 128, None, 1000 + len(self.started)
        self.stopped = False
        FakeProcess.started.append(self)

    def stats(self):
        return {"pid": self.pid}

    def die(self, code: int = -9) -> None:
        self.on_exit(f"the engine process exited (exit code {code})")

    def stop(self, timeout: float = 30.0) -> None:
        self.stopped = True


def _supervisor(max_restarts: int, events: list[str]) -> EngineSupervisor:
    FakeProcess.started = []
    restarted = threading.Event()

    def event(message: str) -> None:
        events.append(message)
        if "restarted" in message:
            restarted.set()

    sup = EngineSupervisor(config=None, max_restarts=max_restarts, start=FakeProcess,
                           on_event=event)
    sup.restarted = restarted
    return sup


def test_supervisor_restarts_then_stays_failed():
    events: list[str] = []
    sup = _supervisor(2, events)
    assert sup.stats() == {"pid": 1000}
    for n in (1, 2):
        sup.restarted.clear()
        FakeProcess.started[-1].die()
        assert sup.restarted.wait(5), events
        assert sup.restarts == n and sup.stats() == {"pid": 1000 + n}
    assert any("restarting (restart 1 of 2)" in e for e in events)
    FakeProcess.started[-1].die(code=-11)
    assert sup.failed and len(FakeProcess.started) == 3
    for call in (sup.stats, lambda: sup.add_request("x"), lambda: sup.load_adapter("a", "a")):
        with pytest.raises(EngineProcessError,
                           match=r"exit code -11\); the engine process died 3 times and is "
                                 r"restarted at most 2 times .*stays failed"):
            call()
    sup.abort("anything")  # nothing to abort: no error
    sup.stop()


def test_supervisor_refuses_calls_while_restarting_and_does_not_restart_after_stop():
    events: list[str] = []
    gate = threading.Event()

    class SlowStart(FakeProcess):
        def __init__(self, config, on_exit):
            if FakeProcess.started:
                gate.wait(5)
            super().__init__(config, on_exit)

    FakeProcess.started = []
    sup = EngineSupervisor(None, 1, start=SlowStart, on_event=events.append)
    first = FakeProcess.started[0]
    first.die()
    with pytest.raises(EngineProcessError, match=r"exit code -9\); the engine is restarting "
                                                 r"\(restart 1 of 1\): retry shortly"):
        sup.stats()
    gate.set()
    deadline = threading.Event()
    for _ in range(50):
        if len(FakeProcess.started) == 2 and sup.pid == FakeProcess.started[1].pid:
            break
        deadline.wait(0.1)
    assert sup.pid == FakeProcess.started[1].pid
    sup.stop()
    assert FakeProcess.started[1].stopped
    FakeProcess.started[1].die()  # a death after stop() is not restarted
    assert len(FakeProcess.started) == 2 and not sup.failed


def test_engine_process_errors_are_unavailable():
    from slora_backend.serving import error_from_exception

    assert error_from_exception(EngineProcessError("restarting")).code == "UNAVAILABLE"


# ---- the adapter model's stub stays light -----------------------------------------------------------


def test_the_adapter_model_imports_no_torch():
    """Everything ``slora_adapters/1/model.py`` imports (besides the stub's own module), in a
    fresh interpreter: torch must not be loaded."""
    code = ("import sys, types\n"
            "sys.modules['triton_python_backend_utils'] = types.ModuleType('pb_utils')\n"
            "from slora_backend.serving import control, control_channel, engine_json, triton_stub\n"
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "print(len(loaded))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", out.stdout + out.stderr
    model = (SOURCE_REPOSITORY / "slora_adapters" / "1" / "model.py").read_text()
    imports = [line for line in model.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["from __future__ import annotations", "import json", "import numpy as np",
                       "import triton_python_backend_utils as pb_utils",
                       "from slora_backend.serving import control, control_channel, engine_json, "
                       "triton_stub"]
