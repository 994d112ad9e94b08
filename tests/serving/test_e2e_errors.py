"""Bad input gets one final error response with a fitting code and a message naming the problem,
and the server goes on serving: a generation running alongside finishes intact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import grpc
import numpy as np
import pytest
from slora_client import SLoRAClient
from slora_client.errors import SLoRAClientError, from_message
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

from tests.serving.conftest import (
    http_post,
    make_adapter_root,
    running_server,
    server_options,
    wait_for,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]

CONTEXT = 512  # max_position_embeddings of the tiny model
NP_TYPES = {"BYTES": np.object_, "INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_,
            "UINT64": np.uint64}


@pytest.fixture(scope="module")
def outside(tmp_path_factory, adapter_pool) -> Path:
    """A valid adapter that lives outside the adapter root."""
    import shutil

    out = tmp_path_factory.mktemp("outside") / "r8-qv"
    shutil.copytree(adapter_pool / "r8-qv", out)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gqa, adapter_pool, outside):
    tmp = tmp_path_factory.mktemp("e2e-errors")
    root = make_adapter_root(adapter_pool, tmp / "adapters", outside=outside)
    with running_server(server_options(tiny_gqa, root), tmp / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with SLoRAClient(server.grpc_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def bystander(client):
    """A long generation started before the bad requests; checked at the end of the module."""
    generation = client.generate("A request that keeps running", max_tokens=300, ignore_eos=True)
    first = next(generation)
    yield generation, first


def send(server, inputs: list[tuple], model: str = "slora") -> tuple[list, SLoRAClientError | None]:
    """One raw streaming request. ``inputs``: (name, datatype, values[, shape]). Returns the
    responses before the end and the error that ended it (None if it ended normally)."""
    request = service_pb2.ModelInferRequest(model_name=model, id="bad-input")
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    for name, datatype, values, *shape in inputs:
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = name, datatype
        tensor.shape.extend(shape[0] if shape else [len(values)])
        arr = np.array(values, dtype=NP_TYPES[datatype])
        request.raw_input_contents.append(
            serialize_byte_tensor(arr).item() if datatype == "BYTES" else arr.tobytes())
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        responses, error = [], None
        # Read to the end of the stream (a stream cancelled early keeps the ensemble alive in
        # Triton 2.51 until its exit timeout).
        for response in stub.ModelStreamInfer(iter([request]), timeout=60):
            assert error is None, "a response after the error"
            if response.error_message:
                error = from_message(response.error_message)
            else:
                responses.append(response)
    final = error is not None or (
        responses and responses[-1].infer_response.parameters["triton_final_response"].bool_param)
    assert final, "the stream ended without a final response"
    return responses, error


def gen_inputs(text=b"Hello there", max_tokens=8, **extra) -> list[tuple]:
    inputs = []
    if text is not None:
        inputs.append(("text_input", "BYTES", [text]))
    if max_tokens is not None:
        inputs.append(("max_tokens", "INT32", [max_tokens]))
    for name, value in extra.items():
        if isinstance(value, tuple):
            inputs.append((name, *value))
        elif isinstance(value, bytes):
            inputs.append((name, "BYTES", [value]))
        elif isinstance(value, float):
            inputs.append((name, "FP32", [value]))
        elif isinstance(value, bool):
            inputs.append((name, "BOOL", [value]))
        else:
            inputs.append((name, "INT32", [value]))
    return inputs


LONG_TEXT = b" ".join([b"word"] * (CONTEXT + 50))

# (id, inputs, code, words the message must contain)
GENERATE_CASES = [
    ("unknown-adapter", gen_inputs(lora_name=b"no-such-adapter"), "NOT_FOUND",
     ["no-such-adapter"]),
    ("symlink-out-adapter", gen_inputs(lora_name=b"escape"), "NOT_FOUND", ["escape"]),
    ("dotdot-adapter", gen_inputs(lora_name=b"../r8-qv"), "NOT_FOUND", ["../r8-qv"]),
    ("corrupt-adapter", gen_inputs(lora_name=b"corrupt"), "INVALID_ARG", ["corrupt"]),
    ("other-base-adapter", gen_inputs(lora_name=b"other-base"), "INVALID_ARG", ["other-base"]),
    ("empty-text", gen_inputs(text=b""), "INVALID_ARG", ["text_input", "empty"]),
    ("text-longer-than-context", gen_inputs(text=LONG_TEXT), "INVALID_ARG",
     ["prompt", str(CONTEXT)]),
    ("max-tokens-zero", gen_inputs(max_tokens=0), "INVALID_ARG", ["max_tokens", "0"]),
    ("max-tokens-negative", gen_inputs(max_tokens=-5), "INVALID_ARG", ["max_tokens", "-5"]),
    ("max-tokens-above-limit", gen_inputs(max_tokens=100_000), "INVALID_ARG",
     ["max_tokens", "100000", "limit"]),
    ("max-tokens-beyond-context", gen_inputs(max_tokens=CONTEXT - 1), "INVALID_ARG",
     ["max_tokens", "context"]),
    ("temperature-negative", gen_inputs(temperature=-0.5), "INVALID_ARG", ["temperature"]),
    ("temperature-nan", gen_inputs(temperature=math.nan), "INVALID_ARG", ["temperature", "NaN"]),
    ("top-p-zero", gen_inputs(top_p=0.0), "INVALID_ARG", ["top_p", "(0, 1]"]),
    ("top-p-above-one", gen_inputs(top_p=1.5), "INVALID_ARG", ["top_p", "1.5"]),
    ("top-p-nan", gen_inputs(top_p=math.nan), "INVALID_ARG", ["top_p"]),
    ("top-k-negative", gen_inputs(top_k=-1), "INVALID_ARG", ["top_k"]),
    ("non-utf8-text", gen_inputs(text=b"caf\xe9 \xff"), "INVALID_ARG",
     ["text_input", "UTF-8", "0xe9"]),
    ("non-utf8-lora-name", gen_inputs(lora_name=b"\xc3\x28"), "INVALID_ARG",
     ["lora_name", "UTF-8"]),
    ("missing-text-input", gen_inputs(text=None), "INVALID_ARG", ["missing", "text_input"]),
    ("missing-max-tokens", gen_inputs(max_tokens=None), "INVALID_ARG",
     ["missing", "max_tokens"]),
]


@pytest.mark.parametrize("case", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_bad_generate_input(server, bystander, case):
    _, inputs, code, words = case
    responses, error = send(server, inputs)
    assert error is not None, f"accepted: {responses}"
    assert responses == [], "an error must come before any generated text"
    assert error.code == code, error.raw
    for word in words:
        assert word in error.message, f"{word!r} not in {error.message!r}"


# Checked by Triton itself before any model runs: the message names the input; gRPC streams
# carry no code for these, so the code is checked over HTTP (400 = INVALID_ARG).
CORE_CASES = [
    ("wrong-dtype", [("text_input", "BYTES", [b"hi"]), ("max_tokens", "FP32", [8.0])],
     ["max_tokens", "FP32", "INT32"]),
    ("wrong-shape", [("text_input", "BYTES", [b"hi", b"there"], [2]),
                     ("max_tokens", "INT32", [8])], ["text_input", "shape"]),
    ("unknown-input", [("text_input", "BYTES", [b"hi"]), ("max_tokens", "INT32", [8]),
                       ("bogus", "INT32", [1])], ["bogus"]),
]


@pytest.mark.parametrize("case", CORE_CASES, ids=[c[0] for c in CORE_CASES])
def test_bad_tensor_rejected_by_triton(server, bystander, case):
    _, inputs, words = case
    responses, error = send(server, inputs)
    assert error is not None and responses == []
    for word in words:
        assert word in error.raw, f"{word!r} not in {error.raw!r}"


def test_bad_input_over_http_is_400(server):
    """HTTP keeps the code as the status: INVALID_ARG -> 400."""
    status, body = http_post(
        f"http://{server.http_url}/v2/models/slora_adapters/infer",
        {"inputs": [{"name": "action", "shape": [1], "datatype": "INT32", "data": [1]}]})
    assert status == 400 and "INT32" in body and "BYTES" in body, body
    status, body = http_post(
        f"http://{server.http_url}/v2/models/slora_adapters/infer",
        {"inputs": [{"name": "action", "shape": [1], "datatype": "BYTES", "data": ["explode"]}]})
    assert status == 400 and "INVALID_ARG: unknown action 'explode'" in body, body
    status, body = http_post(f"http://{server.http_url}/v2/models/slora/generate",
                             {"text_input": "hi", "max_tokens": 8, "temperature": -1})
    assert status == 400 and "INVALID_ARG: temperature" in json.loads(body)["error"], body


ADAPTER_CASES = [
    ("unknown-action", dict(action="explode"), "INVALID_ARG", ["explode", "list"]),
    ("load-dotdot", dict(action="load", lora_name="x1", lora_path="../outside"), "INVALID_ARG",
     ["outside the adapter root"]),
    ("load-absolute-outside", dict(action="load", lora_name="x2", lora_path="{outside}"),
     "INVALID_ARG", ["outside the adapter root"]),
    ("load-symlink-out", dict(action="load", lora_name="x3", lora_path="escape"), "INVALID_ARG",
     ["outside the adapter root"]),
    ("load-corrupt", dict(action="load", lora_name="x4", lora_path="corrupt"), "INVALID_ARG",
     ["corrupt"]),
    ("load-other-base", dict(action="load", lora_name="x5", lora_path="other-base"),
     "INVALID_ARG", ["x5", "another base model"]),
    ("load-bin-pickle", dict(action="load", lora_name="x6", lora_path="bin-only"), "INVALID_ARG",
     [".bin"]),
    ("load-missing-dir", dict(action="load", lora_name="x7", lora_path="nowhere"), "INVALID_ARG",
     ["nowhere"]),
    ("load-without-name", dict(action="load"), "INVALID_ARG", ["lora_name"]),
    ("describe-unknown", dict(action="describe", lora_name="nobody"), "NOT_FOUND", ["nobody"]),
    ("unload-unknown", dict(action="unload", lora_name="nobody"), "NOT_FOUND", ["nobody"]),
    ("abort-without-id", dict(action="abort"), "INVALID_ARG", ["request_id"]),
]


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_bad_adapter_request(client, outside, bystander, case):
    _, kwargs, code, words = case
    kwargs = {k: v.format(outside=outside) for k, v in kwargs.items()}
    action = kwargs.pop("action")
    with pytest.raises(SLoRAClientError) as info:
        client._adapters(action, **kwargs)
    assert info.value.code == code, info.value.raw
    for word in words:
        assert word in info.value.message, f"{word!r} not in {info.value.message!r}"
    # Nothing was registered by a refused load.
    names = {a["name"] for a in client.list_adapters()}
    assert not names & {"x1", "x2", "x3", "x4", "x5", "x6", "x7"}


def test_server_kept_serving(client, bystander):
    generation, first = bystander
    rest = "".join(generation)
    assert generation.finish_reason == "length"
    assert generation.num_output_tokens == 300
    assert first + rest == generation.text
    assert client.complete("Still there?", max_tokens=4).num_output_tokens == 4
    stats = wait_for(lambda: (s := client.stats()) and s["in_flight"] == 0 and s, what="idle")
    assert stats["pool_pages_kv"] == 0 and stats["num_running"] == 0
