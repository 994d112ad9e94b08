"""The serving layer's input parsing (generate requests, adapter actions) and error mapping, on
both sides: the server's error codes and the client's parsing of them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from slora_client.errors import CancelledError, NotFoundError, from_message

from slora_backend.config import SamplingParams
from slora_backend.errors import AdapterBusyError, AdapterNotFoundError, InvalidRequestError
from slora_backend.serving import (
    ControlRequest,
    ServingError,
    error_from_exception,
    parse_adapter_action,
    parse_generate,
)
from tests.serving.serving_fakes import getter


def test_parse_generate_full():
    req = parse_generate(getter(text_input="hi", max_tokens=7, temperature=0.5, top_p=0.9,
                                top_k=5, seed=np.array([2**63 + 1], dtype=np.uint64),
                                stop_words=["a", "", "bc"], ignore_eos=True, stream=True,
                                lora_name="pirate", exclude_input_in_output=True,
                                apply_chat_template=True), max_tokens_limit=100)
    assert req.prompt == "hi" and req.lora_name == "pirate" and req.stream
    assert req.exclude_input_in_output and req.apply_chat_template
    assert req.params == SamplingParams(max_tokens=7, temperature=0.5,
                                        top_p=float(np.float32(0.9)), top_k=5, seed=2**63 + 1,
                                        stop=("a", "bc"), ignore_eos=True)


def test_parse_generate_defaults():
    req = parse_generate(getter(text_input="hi", max_tokens=3, lora_name=""), 100)
    assert req.lora_name is None and not req.stream and not req.exclude_input_in_output
    assert req.params == SamplingParams(max_tokens=3)


@pytest.mark.parametrize("tensors, words", [
    (dict(max_tokens=3), ["missing required input 'text_input'"]),
    (dict(text_input="hi"), ["missing required input 'max_tokens'"]),
    (dict(text_input="", max_tokens=3), ["'text_input' is empty"]),
    (dict(text_input=b"\xffx", max_tokens=3), ["UTF-8", "0xff", "position 0"]),
    (dict(text_input="hi", max_tokens=0), ["max_tokens", ">= 1", "0"]),
    (dict(text_input="hi", max_tokens=101), ["101", "limit of 100"]),
    (dict(text_input="hi", max_tokens=3, temperature=math.nan), ["temperature", "NaN"]),
    (dict(text_input="hi", max_tokens=3, temperature=-1.0), ["temperature", ">= 0"]),
    (dict(text_input="hi", max_tokens=3, top_p=0.0), ["top_p", "(0, 1]"]),
    (dict(text_input="hi", max_tokens=3, top_p=math.nan), ["top_p", "NaN"]),
    (dict(text_input="hi", max_tokens=3, top_k=-2), ["top_k"]),
    (dict(text_input=["a", "b"], max_tokens=3), ["'text_input'", "exactly one value", "[2]"]),
    (dict(text_input="hi", max_tokens=3, lora_name=b"\xc3("), ["lora_name", "UTF-8"]),
    (dict(text_input="hi", max_tokens=3, min_length=2), ["min_length 2", "max_tokens 3"]),
])
def test_parse_generate_errors(tensors, words):
    with pytest.raises(ServingError) as info:
        parse_generate(getter(**tensors), max_tokens_limit=100)
    assert info.value.code == "INVALID_ARG"
    for word in words:
        assert word in info.value.message


def test_min_length_at_max_tokens_means_ignore_eos():
    req = parse_generate(getter(text_input="hi", max_tokens=3, min_length=3), 100)
    assert req.params.ignore_eos


def test_adapter_actions():
    assert parse_adapter_action(getter()).action == "resolve"
    req = parse_adapter_action(getter(action="load", lora_name="x", lora_path="sub/x"))
    assert (req.action, req.lora_name, req.lora_path) == ("load", "x", "sub/x")
    assert ControlRequest.from_json(req.to_json()) == req
    for tensors, word in [(dict(action="nope"), "unknown action 'nope'"),
                          (dict(action="unload"), "needs the input 'lora_name'"),
                          (dict(action="abort"), "needs the input 'request_id'")]:
        with pytest.raises(ServingError, match=word):
            parse_adapter_action(getter(**tensors))
    with pytest.raises(ServingError, match="unknown keys"):
        ControlRequest.from_json('{"action": "list", "evil": 1}')


def test_error_codes():
    assert error_from_exception(AdapterNotFoundError("x")).code == "NOT_FOUND"
    assert error_from_exception(AdapterBusyError("x")).code == "UNAVAILABLE"
    assert error_from_exception(InvalidRequestError("x")).code == "INVALID_ARG"
    assert error_from_exception(RuntimeError("boom")).code == "INTERNAL"
    assert ServingError("NOT_FOUND", "adapter 'x'").wire_message() == "NOT_FOUND: adapter 'x'"


def test_client_error_parsing():
    e = from_message("in ensemble 'slora', NOT_FOUND: adapter 'x' is not registered")
    assert isinstance(e, NotFoundError) and e.code == "NOT_FOUND"
    assert e.message == "adapter 'x' is not registered"
    assert isinstance(from_message("CANCELLED: request 'r' was cancelled"), CancelledError)
    raw = "[request id: 1] inference input 'x' data-type is 'FP32', but model expects 'INT32'"
    e = from_message(raw)
    assert e.code == "UNKNOWN" and e.message == raw
