"""Bad arguments and refused adapters raise errors that say what was wrong; serving goes on."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from slora_backend import (
    AdapterLoadError,
    AdapterNotFoundError,
    Engine,
    EngineConfig,
    InvalidRequestError,
    SamplingParams,
)
from tests.conftest import make_adapter, make_tiny_model

GOOD = SamplingParams(max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(tiny_models["gqa"], root / "good", 8, ["q_proj", "v_proj"], 16)
    engine = Engine(EngineConfig(base_model=str(tiny_models["gqa"]), adapter_root=str(root),
                                 max_model_len=64))
    engine.load_adapter("good", "good")
    return engine, root


def _still_serves(engine):
    out = engine.generate(["still here", "and here"], GOOD, ["good", None])
    assert [len(o.token_ids) for o in out] == [4, 4]
    assert engine.pool.used_by["kv"] == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=-1), "max_tokens must be an integer >= 1, got -1"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1, got 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(temperature=-0.1), "temperature must be >= 0, got -0.1"),
    (dict(temperature=math.nan), "temperature must be >= 0, got nan"),
    (dict(top_k=-3), "top_k must be >= 0"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert message in str(e.value)


def test_bad_requests_are_refused_and_engine_serves_on(setup):
    engine, _ = setup
    cases = [
        (dict(prompt=""), InvalidRequestError, "prompt is empty"),
        (dict(prompt=[]), InvalidRequestError, "prompt is empty"),
        (dict(prompt=[1, 10**9]), InvalidRequestError, "outside the vocabulary"),
        (dict(prompt="x " * 100), InvalidRequestError, "the context holds 64"),
        (dict(prompt="hi", params=SamplingParams(max_tokens=100)), InvalidRequestError,
         "max_tokens 100 is above the limit"),
        (dict(prompt="hi", lora_name="nope"), AdapterNotFoundError, "'nope' is not registered"),
    ]
    for kwargs, error, message in cases:
        kwargs.setdefault("params", GOOD)
        with pytest.raises(error) as e:
            engine.add_request(**kwargs)
        assert message in str(e.value)
    assert not engine._inbox
    _still_serves(engine)


def _copy(root, src, dst):
    shutil.copytree(root / src, root / dst, dirs_exist_ok=True)
    return root / dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_refused_adapters(setup, tiny_models, tmp_path_factory):
    engine, root = setup
    cases = {}
    p = _copy(root, "good", "dora"); _edit_config(p, use_dora=True)
    cases["dora"] = "DoRA adapters"
    p = _copy(root, "good", "saves"); _edit_config(p, modules_to_save=["lm_head"])
    cases["saves"] = "modules_to_save"
    p = _copy(root, "good", "bias"); _edit_config(p, bias="lora_only")
    cases["bias"] = "LoRA bias 'lora_only'"
    p = _copy(root, "good", "biastensor")
    w = load_file(p / "adapter_model.safetensors")
    w["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.zeros(96)
    save_file(w, p / "adapter_model.safetensors")
    cases["biastensor"] = "is not a LoRA A/B weight"
    make_adapter(tiny_models["mha"], root / "other", 8, ["q_proj"], 8)
    cases["other"] = "adapter for another base model"
    p = _copy(root, "good", "fewlayers")
    w = {k: v for k, v in load_file(p / "adapter_model.safetensors").items() if "layers.2." not in k}
    save_file(w, p / "adapter_model.safetensors")
    cases["fewlayers"] = "covers 2 layers, the base model has 3"
    p = _copy(root, "good", "pickle")
    (p / "adapter_model.safetensors").unlink()
    (p / "adapter_model.bin").write_bytes(b"not really a pickle")
    cases["pickle"] = "pickled weights are refused"
    p = _copy(root, "good", "noconfig"); (p / "adapter_config.json").unlink()
    cases["noconfig"] = "adapter_config.json is missing"
    p = _copy(root, "good", "badjson"); (p / "adapter_config.json").write_text("{nope")
    cases["badjson"] = "not valid JSON"
    p = _copy(root, "good", "corrupt")
    data = (p / "adapter_model.safetensors").read_bytes()
    (p / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    cases["corrupt"] = "is corrupt"
    p = _copy(root, "good", "garbage"); (p / "adapter_model.safetensors").write_bytes(b"\x00" * 4)
    cases["garbage"] = "is corrupt"
    p = _copy(root, "good", "regex"); _edit_config(p, target_modules=".*proj")
    cases["regex"] = "as a regex"
    for name, message in cases.items():
        with pytest.raises(AdapterLoadError) as e:
            engine.load_adapter(name, name)
        assert message in str(e.value), (name, str(e.value))
        assert name not in [a.name for a in engine.list_adapters()]
    _still_serves(engine)


def test_paths_outside_the_root_are_refused(setup, tmp_path_factory):
    engine, root = setup
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(root / "good", outside / "evil")
    os.symlink(outside / "evil", root / "link-out")
    for path in ["../outside/evil", str(outside / "evil"), "link-out", "good/../../x"]:
        with pytest.raises(AdapterLoadError) as e:
            engine.load_adapter("evil", path)
        assert "outside the adapter root" in str(e.value)
    with pytest.raises(AdapterNotFoundError):
        engine.add_request("hi", GOOD, lora_name="../outside/evil")
    _still_serves(engine)


def test_unload_and_lazy_resolve(setup, tiny_models):
    engine, root = setup
    make_adapter(tiny_models["gqa"], root / "lazy", 4, ["o_proj"], 4)
    # Not registered, but a directory of that name under the root: loaded on first use.
    out = engine.generate(["lazy"], GOOD, ["lazy"])
    assert len(out[0].token_ids) == 4
    info = engine.describe_adapter("lazy")
    assert info.total_requests == 1 and info.ranks == {"o_proj": 4}
    engine.unload_adapter("lazy")
    assert "lazy" not in [a.name for a in engine.list_adapters()]
    with pytest.raises(AdapterNotFoundError):
        engine.unload_adapter("lazy")
    assert engine.pool.used_by["kv"] == 0


def test_adapter_unloaded_after_validation_fails_only_its_request(setup, tiny_models):
    engine, root = setup
    make_adapter(tiny_models["gqa"], root / "brief", 4, ["q_proj"], 4, seed=9)
    engine.load_adapter("brief", "brief")
    finals = {}
    rid = engine.add_request("hi", GOOD, "brief", on_output=lambda o: finals.__setitem__(o.request_id, o))
    # The request is validated and queued but not yet taken in by the loop: unload it now,
    # bypassing the busy check the way a concurrent unload could slip between the two.
    engine.adapters.registry.unload("brief", active={})
    other = engine.add_request("still", GOOD, on_output=lambda o: finals.__setitem__(o.request_id, o))
    while engine.scheduler.has_work() or engine._inbox:
        engine.step()
    assert finals[rid].finish_reason == "error" and "was unloaded" in finals[rid].error
    assert finals[other].finish_reason == "length"
    assert engine.pool.used_by["kv"] == 0


def test_adapter_damaged_after_registration_fails_only_its_requests(setup, tiny_models):
    engine, root = setup
    make_adapter(tiny_models["gqa"], root / "damaged", 4, ["v_proj"], 4, seed=11)
    engine.load_adapter("damaged", "damaged")
    weights = root / "damaged" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # registered intact, truncated afterwards
    out = engine.generate(["a", "b", "c"], GOOD, ["damaged", "good", None])
    assert out[0].finish_reason == "error" and "damaged" in out[0].error
    assert "cannot read weights" in out[0].error and "bytes of tensor data" in out[0].error
    assert [o.finish_reason for o in out[1:]] == ["length", "length"]
    assert "damaged" not in engine.adapters.cache and engine.pool.used_by["kv"] == 0
    # Repaired on disk, the same name serves again (the failure is not remembered).
    make_adapter(tiny_models["gqa"], root / "damaged", 4, ["v_proj"], 4, seed=11)
    assert engine.generate(["a"], GOOD, ["damaged"])[0].finish_reason == "length"
    engine.unload_adapter("damaged")


def test_a_model_saved_without_a_tokenizer_serves_token_ids(tmp_path):
    model = make_tiny_model(tmp_path / "bare", "mha", tokenizer_dir=tmp_path / "none")
    engine = Engine(EngineConfig(base_model=str(model), max_model_len=64))
    assert engine.tokenizer is None
    out = engine.generate([[5, 6, 7]], GOOD)[0]
    assert len(out.token_ids) == 4 and out.text == ""
    with pytest.raises(InvalidRequestError, match="no tokenizer: give prompts as token ids"):
        engine.add_request("text needs a tokenizer", GOOD)
    with pytest.raises(OSError):  # an explicit tokenizer path must exist
        Engine(EngineConfig(base_model=str(model), tokenizer=str(tmp_path / "none")))
