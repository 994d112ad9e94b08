"""Requests as Triton's OpenAI frontend builds them with ``--backend vllm`` (its
``engine/utils/triton.py``: ``_create_vllm_inference_request``) and as genai-perf's vLLM
converter builds them, sent over gRPC, and the responses read back as the frontend reads them
(``text_output``; the UINT32 ``num_input_tokens`` once, ``num_output_tokens`` summed over the
responses)."""

from __future__ import annotations

import json
import queue
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient


@dataclass
class FrontendAnswer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    responses: int


def tensor(name: str, datatype: str, value) -> grpcclient.InferInput:
    """A [1] BYTES or BOOL input."""
    t = grpcclient.InferInput(name, [1], datatype)
    t.set_data_from_numpy(np.array([value], dtype=np.object_ if datatype == "BYTES" else np.bool_))
    return t


def frontend_inputs(prompt: str, stream: bool, sampling: dict, echo: bool | None = None) -> list:
    """The six tensors the frontend sends: shapes [1], BYTES / BOOL."""
    return [
        tensor("text_input", "BYTES", prompt.encode()),
        tensor("stream", "BOOL", stream),
        tensor("exclude_input_in_output", "BOOL", True if echo is None else not echo),
        tensor("sampling_parameters", "BYTES", json.dumps(sampling).encode()),
        tensor("return_num_input_tokens", "BOOL", True),
        tensor("return_num_output_tokens", "BOOL", True),
    ]


def completion_sampling(max_tokens: int, lora_name: str | None = None, **fields) -> dict:
    """``sampling_parameters`` of a /v1/completions request: the request's fields that are set
    (defaults included), ``max_tokens`` and ``lora_name``."""
    sampling = dict(frequency_penalty=0, n=1, presence_penalty=0, temperature=0.0, top_p=1,
                    best_of=1, ignore_eos=True, **fields, max_tokens=max_tokens)
    if lora_name is not None:
        sampling["lora_name"] = lora_name
    return sampling


def genai_perf_vllm_inputs(prompt: str, max_tokens: int, **extra_inputs: str) -> list:
    """genai-perf ``--backend vllm --streaming --output-tokens-mean N
    --output-tokens-mean-deterministic [--extra-inputs k:v]``: numbers as JSON strings, no
    ``return_num_*`` inputs, each extra input a [1] BYTES tensor of its own."""
    sampling = {"max_tokens": str(max_tokens), "min_tokens": str(max_tokens)}
    return [tensor("text_input", "BYTES", prompt.encode()),
            tensor("exclude_input_in_output", "BOOL", True), tensor("stream", "BOOL", True),
            tensor("sampling_parameters", "BYTES", json.dumps(sampling).encode()),
            *(tensor(k, "BYTES", v.encode()) for k, v in extra_inputs.items())]


def send(grpc_url: str, inputs: list, model: str = "slora", timeout: float = 120) -> FrontendAnswer:
    """One request over a gRPC stream; every response until the final one."""
    client = grpcclient.InferenceServerClient(grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        text, prompt_tokens, completion_tokens, count = "", None, 0, 0
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                raise error
            final = result.get_response().parameters["triton_final_response"].bool_param
            out = result.as_numpy("text_output")
            if out is not None:
                count += 1
                text += b"".join(out.reshape(-1)).decode()
                n_in, n_out = result.as_numpy("num_input_tokens"), result.as_numpy("num_output_tokens")
                assert n_in.dtype == np.uint32 and n_out.dtype == np.uint32  # all the frontend reads
                if prompt_tokens is None:
                    prompt_tokens = int(n_in.reshape(-1)[0])
                completion_tokens += int(n_out.reshape(-1)[0])
            if final:
                return FrontendAnswer(text, prompt_tokens or 0, completion_tokens, count)
    finally:
        client.stop_stream()
        client.close()
