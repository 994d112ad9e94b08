"""Building requests for the serving models and reading their responses (gRPC protobufs)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import serialize_byte_tensor

from .errors import SLoRAClientError, from_message

GENERATE_MODEL = "slora"
ADAPTERS_MODEL = "slora_adapters"

_DTYPES = {"BYTES": np.object_, "INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64,
           "BOOL": np.bool_}


def _add_input(request: service_pb2.ModelInferRequest, name: str, datatype: str,
               values: list[Any]) -> None:
    tensor = request.inputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend([len(values)])
    if datatype == "BYTES":
        encoded = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
        raw = serialize_byte_tensor(np.array(encoded, dtype=np.object_)).item()
    else:
        raw = np.array(values, dtype=_DTYPES[datatype]).tobytes()
    request.raw_input_contents.append(raw)


def new_request_id() -> str:
    return uuid.uuid4().hex


def generate_request(
    model: str, request_id: str, prompt: str | bytes, *, max_tokens: int,
    lora_name: str | None = None, temperature: float | None = None, top_p: float | None = None,
    top_k: int | None = None, seed: int | None = None, stop: list[str] | None = None,
    ignore_eos: bool | None = None, chat: bool = False, stream: bool = True,
    exclude_input_in_output: bool | None = None,
) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    # Ask for the final-response flag on every response, so the end of a request is explicit.
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    _add_input(request, "text_input", "BYTES", [prompt])
    _add_input(request, "max_tokens", "INT32", [max_tokens])
    _add_input(request, "stream", "BOOL", [stream])
    if lora_name:
        _add_input(request, "lora_name", "BYTES", [lora_name])
    if temperature is not None:
        _add_input(request, "temperature", "FP32", [temperature])
    if top_p is not None:
        _add_input(request, "top_p", "FP32", [top_p])
    if top_k is not None:
        _add_input(request, "top_k", "INT32", [top_k])
    if seed is not None:
        _add_input(request, "seed", "UINT64", [seed])
    if stop:
        _add_input(request, "stop_words", "BYTES", list(stop))
    if ignore_eos is not None:
        _add_input(request, "ignore_eos", "BOOL", [ignore_eos])
    if chat:
        _add_input(request, "apply_chat_template", "BOOL", [True])
    if exclude_input_in_output is not None:
        _add_input(request, "exclude_input_in_output", "BOOL", [exclude_input_in_output])
    return request


def adapters_request(model: str, action: str, lora_name: str | None = None,
                     lora_path: str | None = None,
                     request_id: str | None = None,
                     admin_token: str | None = None) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    _add_input(request, "action", "BYTES", [action])
    if admin_token:
        _add_input(request, "admin_token", "BYTES", [admin_token])
    if lora_name:
        _add_input(request, "lora_name", "BYTES", [lora_name])
    if lora_path:
        _add_input(request, "lora_path", "BYTES", [lora_path])
    if request_id:
        _add_input(request, "request_id", "BYTES", [request_id])
    return request


def adapters_result(response: service_pb2.ModelInferResponse) -> Any:
    value = InferResult(response).as_numpy("result")
    if value is None:
        raise SLoRAClientError("INTERNAL", "the adapters model answered without 'result'")
    return json.loads(value.reshape(-1)[0])


@dataclass(frozen=True)
class Chunk:
    """One streamed response: a text delta and the counts so far."""

    text: str
    finish_reason: str | None  # set on the last chunk
    num_input_tokens: int
    num_output_tokens: int
    final: bool


def _scalar(result: InferResult, name: str) -> Any:
    value = result.as_numpy(name)
    return None if value is None or value.size == 0 else value.reshape(-1)[0]


def read_chunk(response: service_pb2.ModelStreamInferResponse) -> Chunk:
    """Raises ``SLoRAClientError`` for an error response."""
    if response.error_message:
        raise from_message(response.error_message)
    infer = response.infer_response
    final = infer.parameters["triton_final_response"].bool_param \
        if "triton_final_response" in infer.parameters else False
    if not infer.outputs:  # the empty final response
        return Chunk("", None, 0, 0, final)
    result = InferResult(infer)
    text = _scalar(result, "text_output")
    reason = _scalar(result, "finish_reason")
    n_in = _scalar(result, "num_input_tokens")
    n_out = _scalar(result, "num_output_tokens")
    return Chunk(
        text=text.decode("utf-8") if text is not None else "",
        finish_reason=(reason.decode("utf-8") or None) if reason is not None else None,
        num_input_tokens=int(n_in) if n_in is not None else 0,
        num_output_tokens=int(n_out) if n_out is not None else 0,
        final=final,
    )
