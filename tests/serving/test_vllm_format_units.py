"""The vLLM request format (what Triton's OpenAI frontend sends with ``--backend vllm``), the
per-response token counts it sums, and the adapter list it reads, without a server."""

from __future__ import annotations

import json
import threading
import time

import pytest

from slora_backend.config import SamplingParams
from slora_backend.serving import ServingError, StreamRouter, parse_adapter_action, parse_generate
from slora_backend.serving.lora_manifest import LORA_FILE, MODEL_FILE, LoraManifest
from tests.serving.serving_fakes import FakeEngine, FakeSink, getter, wait_added


def vllm_getter(prompt="hi", stream=False, echo=False, **sampling):
    """The tensors the frontend's ``_create_vllm_inference_request`` builds."""
    return getter(text_input=prompt, stream=stream, exclude_input_in_output=not echo,
                  sampling_parameters=json.dumps(sampling), return_num_input_tokens=True,
                  return_num_output_tokens=True)


# What the frontend sends for a plain completion: the OpenAI request's defaults included.
FRONTEND_DEFAULTS = dict(frequency_penalty=0, n=1, presence_penalty=0, temperature=0.0, top_p=1,
                         ignore_eos=True, best_of=1, logit_bias={}, logprobs=None)


def test_sampling_parameters_map_onto_the_engine_params():
    req = parse_generate(vllm_getter(**FRONTEND_DEFAULTS, max_tokens=10, top_k=3, seed=7,
                                     stop=["\n", "END"], lora_name="pirate"), max_tokens_limit=100)
    assert req.params == SamplingParams(max_tokens=10, temperature=0.0, top_p=1.0, top_k=3, seed=7,
                                        stop=("\n", "END"), ignore_eos=True)
    assert req.lora_name == "pirate" and req.exclude_input_in_output and not req.stream
    assert req.per_response_counts
    one_stop = parse_generate(vllm_getter(max_tokens=2, stop="x"), 100)
    assert one_stop.params.stop == ("x",) and one_stop.lora_name is None


@pytest.mark.parametrize("sampling, problem", [
    (dict(max_tokens=4, best_guess=1), "unknown key(s) ['best_guess']"),
    (dict(max_tokens=4, n=2), "n=2 is not supported by this server (allowed: 1)"),
    (dict(max_tokens=4, presence_penalty=0.5), "presence_penalty=0.5 is not supported"),
    (dict(max_tokens=4, frequency_penalty=1), "frequency_penalty=1 is not supported"),
    (dict(max_tokens=4, logprobs=True), "logprobs=True is not supported"),
    (dict(max_tokens=4, logit_bias={"5": 1}), "logit_bias={'5': 1} is not supported"),
    (dict(max_tokens="four"), "max_tokens must be an integer, got 'four'"),
    (dict(max_tokens="4.5"), "max_tokens must be an integer, got '4.5'"),
    (dict(max_tokens=8, min_tokens=3), "min_length 3 below max_tokens 8 is not supported"),
    (dict(max_tokens=4, temperature="hot"), "temperature must be a number, got 'hot'"),
    (dict(max_tokens=4, stop=[1]), "stop must be a string or a list of strings"),
    (dict(max_tokens=4, lora_name=3), "lora_name must be a string, got 3"),
    (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
    (dict(max_tokens=500), "max_tokens 500 is above the limit of 100"),
    (dict(max_tokens=4, top_p=0), "top_p must be in (0, 1], got 0"),
    (dict(temperature=0.0), "missing required input 'max_tokens'"),
])
def test_bad_sampling_parameters_are_refused_by_name(sampling, problem):
    with pytest.raises(ServingError) as e:
        parse_generate(vllm_getter(**sampling), max_tokens_limit=100)
    assert e.value.code == "INVALID_ARG" and problem in str(e.value)


def test_genai_perf_vllm_payload_numbers_as_strings():
    """genai-perf's vLLM converter: max_tokens (and min_tokens when deterministic) as strings."""
    req = parse_generate(getter(text_input="hi", stream=True, exclude_input_in_output=True,
                                sampling_parameters=json.dumps({"max_tokens": "12", "min_tokens": "12"})),
                         100)
    assert req.params.max_tokens == 12 and req.params.ignore_eos and not req.per_response_counts
    strings = parse_generate(vllm_getter(max_tokens="3", temperature="0.5", ignore_eos="true"), 100)
    assert strings.params == SamplingParams(max_tokens=3, temperature=0.5, ignore_eos=True)


def test_sampling_parameters_that_are_not_an_object_or_disagree_are_refused():
    for raw, problem in [("{", "is not JSON"), ("[1]", "must be a JSON object, got list")]:
        with pytest.raises(ServingError, match="sampling_parameters") as e:
            parse_generate(getter(text_input="hi", sampling_parameters=raw), 100)
        assert problem in str(e.value)
    with pytest.raises(ServingError, match="'max_tokens' is given both as an input and in"):
        parse_generate(getter(text_input="hi", max_tokens=5,
                              sampling_parameters=json.dumps({"max_tokens": 6})), 100)
    same = parse_generate(getter(text_input="hi", max_tokens=5,
                                 sampling_parameters=json.dumps({"max_tokens": 5})), 100)
    assert same.params.max_tokens == 5
    with pytest.raises(ServingError, match="return_logprobs: this server does not return logprobs"):
        parse_generate(getter(text_input="hi", max_tokens=5, return_logprobs=True), 100)


def test_the_ensemble_adapter_step_reads_lora_name_from_sampling_parameters():
    get = getter(sampling_parameters=json.dumps({"max_tokens": 3, "lora_name": "pirate"}))
    assert parse_adapter_action(get).lora_name == "pirate"
    assert parse_adapter_action(getter(sampling_parameters=json.dumps({"max_tokens": 3}))).lora_name is None
    with pytest.raises(ServingError, match="unknown key"):
        parse_adapter_action(getter(sampling_parameters=json.dumps({"bogus": 1})))


def _stream_counts(per_response: bool) -> list:
    engine, sink = FakeEngine(), FakeSink()
    router = StreamRouter(engine)
    sampling = json.dumps({"max_tokens": 4})
    request = parse_generate(getter(text_input="Q", stream=True, sampling_parameters=sampling,
                                    return_num_output_tokens=per_response), 100)
    try:
        router.submit(request, "c", sink, time.monotonic())
        rid = wait_added(engine)
        for i, text in enumerate("abc"):
            engine.emit(rid, list(range(i + 1)), text)
            time.sleep(0.03)
        engine.emit(rid, [0, 1, 2, 3], "d", finished=True, reason="length", text="abcd")
        assert sink.done.wait(5)
    finally:
        router.stop()
    assert "".join(p.text for p, e, f in sink.sent) == "abcd"
    return [p.num_output_tokens for p, e, f in sink.sent]


def test_streamed_counts_are_per_response_when_asked_else_running_totals():
    per_response = _stream_counts(True)
    assert sum(per_response) == 4 and all(c >= 1 for c in per_response)
    running = _stream_counts(False)
    assert running[-1] == 4 and running == sorted(running)


def test_manifest_files_are_what_the_frontend_reads(tmp_path):
    (tmp_path / "slora" / "1").mkdir(parents=True)
    (tmp_path / "slora" / "3").mkdir()
    (tmp_path / "slora" / "notes").mkdir()
    manifest = LoraManifest.for_repository(tmp_path)
    assert manifest is not None and manifest.version_dir == tmp_path / "slora" / "3"
    manifest.enable()
    assert json.loads((manifest.version_dir / MODEL_FILE).read_text()) == {"enable_lora": True}
    assert manifest.sync({"b": "/r/b", "a": "/r/a"})
    assert json.loads((manifest.version_dir / LORA_FILE).read_text()) == {"a": "/r/a", "b": "/r/b"}
    assert not manifest.sync({"a": "/r/a", "b": "/r/b"})  # unchanged: not rewritten
    assert manifest.sync({"a": "/r/a"})
    assert json.loads((manifest.version_dir / LORA_FILE).read_text()) == {"a": "/r/a"}
    assert sorted(p.name for p in manifest.version_dir.iterdir()) == sorted([LORA_FILE, MODEL_FILE])
    assert LoraManifest.for_repository(tmp_path / "missing") is None


def test_manifest_refresh_asks_for_the_list_only_when_the_registry_file_changed(tmp_path):
    manifest, registry, asked = LoraManifest(tmp_path), tmp_path / "registry.json", []

    def adapters():
        asked.append(1)
        return json.loads(registry.read_text())["adapters"] if registry.exists() else {}

    assert not manifest.refresh(registry, adapters) and asked == []  # no file yet: nothing to do
    registry.write_text(json.dumps({"adapters": {"a": "/r/a"}}))
    assert manifest.refresh(registry, adapters) and len(asked) == 1
    assert not manifest.refresh(registry, adapters) and len(asked) == 1  # unchanged: not asked
    registry.write_text(json.dumps({"adapters": {"a": "/r/a", "bb": "/r/bb"}}))
    assert manifest.refresh(registry, adapters) and len(asked) == 2
    assert json.loads((tmp_path / LORA_FILE).read_text()) == {"a": "/r/a", "bb": "/r/bb"}


def test_manifest_readers_never_see_a_partial_file(tmp_path):
    manifest = LoraManifest(tmp_path)
    big = {f"adapter-{i}": f"/root/adapter-{i}" * 20 for i in range(2000)}
    manifest.sync({})
    stop, seen = threading.Event(), []

    def read():
        while not stop.is_set():
            seen.append(len(json.loads((tmp_path / LORA_FILE).read_text())))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(20):
            manifest.sync(big if i % 2 == 0 else {})
    finally:
        stop.set()
        reader.join()
    assert seen and set(seen) <= {0, len(big)}
