"""Input tensors (numpy arrays, as the Python backend gives them) -> typed engine requests."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidRequestError
from .errors import INVALID_ARG, ServingError

if TYPE_CHECKING:  # config imports torch; the adapter model reads its inputs here without it
    from ..config import SamplingParams

TensorGetter = Callable[[str], "np.ndarray | None"]


def _one(get: TensorGetter, name: str, required: bool = False) -> Any:
    arr = get(name)
    if arr is None:
        if required:
            raise ServingError(INVALID_ARG, f"missing required input '{name}'")
        return None
    if arr.size != 1:
        raise ServingError(
            INVALID_ARG, f"input '{name}' must hold exactly one value, got shape {list(arr.shape)}"
        )
    return arr.reshape(-1)[0]


def decode_utf8(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    raw = bytes(value)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ServingError(
            INVALID_ARG,
            f"input '{name}' is not valid UTF-8: byte 0x{raw[e.start]:02x} at position {e.start}",
        ) from None


def get_str(get: TensorGetter, name: str, required: bool = False) -> str | None:
    value = _one(get, name, required)
    return None if value is None else decode_utf8(name, value)


def get_int(get: TensorGetter, name: str, required: bool = False) -> int | None:
    value = _one(get, name, required)
    return None if value is None else int(value)


def get_float(get: TensorGetter, name: str) -> float | None:
    value = _one(get, name)
    return None if value is None else float(value)


def get_bool(get: TensorGetter, name: str, default: bool) -> bool:
    value = _one(get, name)
    return default if value is None else bool(value)


def get_str_list(get: TensorGetter, name: str) -> list[str]:
    arr = get(name)
    if arr is None:
        return []
    return [decode_utf8(name, v) for v in arr.reshape(-1)]


@dataclass(frozen=True)
class GenerateRequest:
    """One generation request as the engine model understands it."""

    prompt: str
    params: SamplingParams
    lora_name: str | None
    stream: bool
    exclude_input_in_output: bool
    apply_chat_template: bool
    # The vLLM format's ``return_num_output_tokens``: each streamed response then carries the
    # tokens of that response only (the OpenAI frontend sums them), not the running total.
    per_response_counts: bool = False


def parse_generate(get: TensorGetter, max_tokens_limit: int) -> GenerateRequest:
    """Read the generation inputs (names as in ``model_repository/slora/config.pbtxt``), in either
    format: separate tensors or the vLLM format's ``sampling_parameters`` (``vllm_format``)."""
    from .vllm_format import overlay  # (vllm_format reads its tensors with this module's helpers)

    get = overlay(get)
    if get_bool(get, "return_logprobs", False):
        raise ServingError(INVALID_ARG, "return_logprobs: this server does not return logprobs")
    prompt = get_str(get, "text_input", required=True)
    assert prompt is not None
    if not prompt:
        raise ServingError(INVALID_ARG, "input 'text_input' is empty")
    max_tokens = get_int(get, "max_tokens", required=True)
    assert max_tokens is not None
    if max_tokens <= 0:
        raise ServingError(INVALID_ARG, f"max_tokens must be >= 1, got {max_tokens}")
    if max_tokens > max_tokens_limit:
        raise ServingError(
            INVALID_ARG, f"max_tokens {max_tokens} is above the limit of {max_tokens_limit}"
        )
    temperature = get_float(get, "temperature")
    top_p = get_float(get, "top_p")
    if temperature is not None and math.isnan(temperature):
        raise ServingError(INVALID_ARG, "temperature must be a number >= 0, got NaN")
    if top_p is not None and math.isnan(top_p):
        raise ServingError(INVALID_ARG, "top_p must be in (0, 1], got NaN")
    ignore_eos = get_bool(get, "ignore_eos", False)
    min_length = get_int(get, "min_length")
    if min_length is not None and min_length > 0:
        if min_length < max_tokens:
            raise ServingError(
                INVALID_ARG, f"min_length {min_length} below max_tokens {max_tokens} is not "
                "supported; min_length >= max_tokens (or ignore_eos) asks for exactly max_tokens")
        ignore_eos = True
    kwargs: dict[str, Any] = dict(
        max_tokens=max_tokens,
        stop=tuple(s for s in get_str_list(get, "stop_words") if s),
        ignore_eos=ignore_eos,
    )
    if temperature is not None:
        kwargs["temperature"] = temperature
    if top_p is not None:
        kwargs["top_p"] = top_p
    top_k = get_int(get, "top_k")
    if top_k is not None:
        kwargs["top_k"] = top_k
    seed = get_int(get, "seed")
    if seed is not None:
        kwargs["seed"] = seed
    try:
        from ..config import SamplingParams

        params = SamplingParams(**kwargs)
    except (InvalidRequestError, ValueError, TypeError) as e:
        raise ServingError(INVALID_ARG, str(e)) from None
    lora_name = get_str(get, "lora_name") or None
    return GenerateRequest(
        prompt=prompt,
        params=params,
        lora_name=lora_name,
        stream=get_bool(get, "stream", False),
        exclude_input_in_output=get_bool(get, "exclude_input_in_output", False),
        apply_chat_template=get_bool(get, "apply_chat_template", False),
        per_response_counts=get_bool(get, "return_num_output_tokens", False),
    )


def chat_prompt(tokenizer: Any, text: str) -> str:
    """``text`` as one user turn in the tokenizer's chat template, ready for the answer."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ServingError(INVALID_ARG, "apply_chat_template: this model's tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
