"""The adapter name rule (one, shared by the engine and the Triton models), idempotent loads
across a restart, and adapter configs whose rank or alpha disagree with their tensors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from slora_backend import (
    AdapterExistsError,
    AdapterLoadError,
    AdapterNotFoundError,
    Engine,
    EngineConfig,
    SamplingParams,
)
from slora_backend.adapters.names import (
    MAX_NAME_BYTES,
    InvalidAdapterNameError,
    adapter_dir,
    check_adapter_name,
    name_problem,
)
from slora_backend.serving.control import AdapterNames
from slora_backend.serving.errors import ServingError, error_from_exception
from tests.conftest import make_adapter

GOOD = SamplingParams(max_tokens=4, ignore_eos=True)
NON_ASCII = "адаптер-ü-日本"


def test_names_module_imports_no_torch():
    """The slora_adapters model's stub checks names without loading torch."""
    code = ("import sys, slora_backend.adapters.names as n; n.check_adapter_name('ok'); "
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("name", ["a", "r8-qv", NON_ASCII, " padded ", "a.b", "...", "x" * 255,
                                  "é" * 127, "tab\there"])
def test_names_a_directory_can_have_are_valid(name):
    assert name_problem(name) is None and check_adapter_name(name) == name


@pytest.mark.parametrize("name, problem", [
    ("", "must not be empty"),
    ("x" * 10_000, "is 10000 bytes long in UTF-8; at most 255 are allowed"),
    ("é" * 128, f"is 256 bytes long in UTF-8; at most {MAX_NAME_BYTES} are allowed"),
    ("a\0b", "contains a NUL character at position 1"),
    ("a/b", "contains the path separator '/'"),
    (".", "names a directory itself"),
    ("..", "names a directory itself"),
    ("\ud800", "is not valid Unicode"),
    (7, "must be a string, got int"),
])
def test_names_that_cannot_be_paths_are_refused_by_name(name, problem):
    with pytest.raises(InvalidAdapterNameError, match=problem) as e:
        check_adapter_name(name)
    assert len(str(e.value)) < 300  # a 10,000-character name is cut in the message
    with pytest.raises(AdapterNotFoundError, match=problem):
        check_adapter_name(name, AdapterNotFoundError)


@pytest.fixture(scope="module")
def root(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("names-root")
    make_adapter(tiny_models["gqa"], root / "good", 8, ["q_proj", "v_proj"], 16)
    shutil.copytree(root / "good", root / NON_ASCII)
    make_adapter(tiny_models["gqa"], root / "other", 4, ["o_proj"], 8)
    return root


def _engine(tiny_models, root) -> Engine:
    return Engine(EngineConfig(base_model=str(tiny_models["gqa"]), adapter_root=str(root),
                               max_model_len=64))


def test_serving_and_engine_apply_one_rule(root):
    """``AdapterNames`` (the ensemble's check) refuses what the engine refuses, as NOT_FOUND."""
    names = AdapterNames(root)
    assert names.check(NON_ASCII) == {"name": NON_ASCII, "registered": False}
    assert adapter_dir(root, NON_ASCII) == (root / NON_ASCII).resolve()
    for bad, problem in [("x" * 10_000, "at most 255"), ("good\0", "NUL"), ("good/..", "separator"),
                         ("..", "directory itself")]:
        with pytest.raises(ServingError, match=problem) as e:
            names.check(bad)
        assert e.value.code == "NOT_FOUND"
        assert adapter_dir(root, bad) is None


def test_rerun_script_load_is_idempotent(tiny_models, root):
    """A script that loads its adapters runs twice against one root (registry.json persists)."""
    for run in range(2):
        engine = _engine(tiny_models, root)
        info = engine.load_adapter("mine", "good")
        assert info.name == "mine" and info.rank == 8
        again = engine.load_adapter("mine", str(root / "good"))  # the same path, spelled otherwise
        assert again.to_dict() == engine.describe_adapter("mine").to_dict()
        with pytest.raises(AdapterExistsError) as e:
            engine.load_adapter("mine", "other")
        assert f"registered with path {str((root / 'good').resolve())!r}" in str(e.value)
        assert error_from_exception(e.value).code == "ALREADY_EXISTS"
        assert engine.describe_adapter("mine").ranks == {"q_proj": 8, "v_proj": 8}
        assert len(engine.generate([[5, 6, 7]], GOOD, ["mine"])[0].token_ids) == 4
    saved = json.loads((root / "registry.json").read_text(encoding="utf-8"))
    assert saved["adapters"]["mine"] == "good"
    engine.unload_adapter("mine")


def test_non_ascii_adapter_registers_persists_and_serves(tiny_models, root):
    engine = _engine(tiny_models, root)
    out = engine.generate([[5, 6, 7], [5, 6, 7]], GOOD, [NON_ASCII, "good"])
    assert out[0].token_ids == out[1].token_ids  # the same weights under two names
    assert NON_ASCII in json.loads((root / "registry.json").read_text(encoding="utf-8"))["adapters"]
    assert NON_ASCII in [a.name for a in _engine(tiny_models, root).list_adapters()]  # restored
    engine.unload_adapter(NON_ASCII)


@pytest.mark.parametrize("bad", ["x" * 10_000, "a\0b", "good/..", "..", "."])
def test_engine_names_bad_names(tiny_models, root, bad):
    engine = _engine(tiny_models, root)
    with pytest.raises(InvalidAdapterNameError) as e:
        engine.load_adapter(bad, "good")
    assert error_from_exception(e.value).code == "INVALID_ARG"
    with pytest.raises(AdapterNotFoundError) as e:
        engine.add_request([5, 6], GOOD, lora_name=bad)
    assert error_from_exception(e.value).code == "NOT_FOUND"
    assert "adapter name" in str(e.value) and len(str(e.value)) < 300


def test_long_path_is_a_named_error(tiny_models, root):
    engine = _engine(tiny_models, root)
    with pytest.raises(AdapterLoadError, match="File name too long") as e:
        engine.load_adapter("long", "y" * 10_000)
    assert error_from_exception(e.value).code == "INVALID_ARG"


def _with_config(src, dest, **changes):
    shutil.copytree(src, dest)
    config = json.loads((dest / "adapter_config.json").read_text())
    config.update(changes)
    (dest / "adapter_config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("changes, message", [
    (dict(r=4), "adapter_config.json says r = 4 but the tensors have rank q_proj 8, v_proj 8"),
    (dict(r=0), "r must be a positive integer, got 0"),
    (dict(r="8"), "r must be a positive integer, got '8'"),
    (dict(lora_alpha=0), "lora_alpha must be a positive finite number, got 0"),
    (dict(lora_alpha=-2.0), "lora_alpha must be a positive finite number, got -2.0"),
    (dict(lora_alpha=True), "lora_alpha must be a positive finite number, got True"),
    (dict(lora_alpha="16"), "lora_alpha must be a positive finite number, got '16'"),
    (dict(lora_alpha=float("inf")), "lora_alpha must be a positive finite number, got inf"),
])
def test_config_must_agree_with_tensors(tiny_models, root, changes, message):
    name = f"cfg-{abs(hash(json.dumps(changes))) % 10**8}"
    _with_config(root / "good", root / name, **changes)
    engine = _engine(tiny_models, root)
    with pytest.raises(AdapterLoadError) as e:
        engine.load_adapter(name, name)
    assert message in str(e.value)
    shutil.rmtree(root / name)


def test_config_without_r_takes_the_tensors_rank(tiny_models, root):
    dest = root / "no-r"
    _with_config(root / "good", dest)
    config = json.loads((dest / "adapter_config.json").read_text())
    del config["r"]
    (dest / "adapter_config.json").write_text(json.dumps(config))
    assert _engine(tiny_models, root).load_adapter("no-r", "no-r").rank == 8
