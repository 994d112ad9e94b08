"""The vLLM backend's request format, as Triton's OpenAI frontend (``--backend vllm``) and
genai-perf (``--backend vllm``) send it.

Such a request carries ``sampling_parameters``: one JSON object whose keys are the OpenAI
request's fields (less model, prompt, stream, echo and the like) plus ``max_tokens`` and
``lora_name``. ``SamplingParameters.parse`` checks it and ``overlay`` presents its values under
this server's tensor names, so that the same checks apply whichever format a request uses.

Rules:
- a key outside ``SUPPORTED`` and ``NEUTRAL`` is refused with INVALID_ARG naming it;
- a ``NEUTRAL`` key (one vLLM supports and this engine does not) passes only at its neutral value
  (``n`` 1, ``presence_penalty`` 0, ``logprobs`` unset/false, ...); any other value is refused
  with a message naming the key, its value and the value that would pass;
- a key given both here and as a tensor of its own must agree, else INVALID_ARG;
- numbers and booleans may come as JSON strings ("64", "0.5", "true"), as genai-perf sends
  them and the vLLM backend accepts them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import INVALID_ARG, ServingError
from .inputs import TensorGetter, decode_utf8

SAMPLING_PARAMETERS_INPUT = "sampling_parameters"

# JSON key -> the tensor name this server reads it as (the checks of that tensor apply).
SUPPORTED: Mapping[str, str] = {
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop_words",
    "ignore_eos": "ignore_eos",
    "lora_name": "lora_name",
    # genai-perf's --output-tokens-mean-deterministic sends min_tokens = max_tokens: read as
    # TensorRT-LLM's min_length (>= max_tokens: exactly max_tokens; a smaller positive value is
    # refused).
    "min_tokens": "min_length",
}


def _unset_or(*values: Any):
    def neutral(value: Any) -> bool:
        return value is None or (not isinstance(value, (dict, list)) and value in values)
    return neutral


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == []


# Keys vLLM (and the OpenAI API) know that this engine does not implement: accepted at the
# value that means "off", refused otherwise. (name -> (test, what passes, for the message))
NEUTRAL: Mapping[str, tuple[Any, str]] = {
    "n": (_unset_or(1), "1"),
    "best_of": (_unset_or(1), "1"),
    "presence_penalty": (_unset_or(0), "0"),
    "frequency_penalty": (_unset_or(0), "0"),
    "repetition_penalty": (_unset_or(1), "1"),
    "min_p": (_unset_or(0), "0"),
    "logprobs": (_unset_or(False, 0), "unset, false or 0"),
    "top_logprobs": (_unset_or(0), "unset or 0"),
    "prompt_logprobs": (_unset_or(0), "unset or 0"),
    "logit_bias": (_empty, "unset or empty"),
    "stop_token_ids": (_empty, "unset or empty"),
    "skip_special_tokens": (_unset_or(True), "true"),
}


@dataclass(frozen=True)
class SamplingParameters:
    """A checked ``sampling_parameters`` object: its supported keys under tensor names."""

    values: Mapping[str, Any]

    @classmethod
    def parse(cls, raw: str) -> SamplingParameters:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ServingError(INVALID_ARG, f"input '{SAMPLING_PARAMETERS_INPUT}' is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise ServingError(INVALID_ARG, f"input '{SAMPLING_PARAMETERS_INPUT}' must be a JSON "
                                            f"object, got {type(data).__name__}")
        unknown = sorted(k for k in data if k not in SUPPORTED and k not in NEUTRAL)
        if unknown:
            raise ServingError(INVALID_ARG, f"{SAMPLING_PARAMETERS_INPUT}: unknown key(s) {unknown}; "
                                            f"supported: {sorted(SUPPORTED)}, accepted at their "
                                            f"neutral value only: {sorted(NEUTRAL)}")
        for key in sorted(k for k in data if k in NEUTRAL):
            is_neutral, allowed = NEUTRAL[key]
            if not is_neutral(data[key]):
                raise ServingError(INVALID_ARG, f"{SAMPLING_PARAMETERS_INPUT}: {key}={data[key]!r} "
                                                f"is not supported by this server (allowed: {allowed})")
        values: dict[str, Any] = {}
        for key, tensor in SUPPORTED.items():
            value = data.get(key)
            if value is None:
                continue
            values[tensor] = _as_array(key, tensor, value)
        return cls(values)


def _as_array(key: str, tensor: str, value: Any) -> np.ndarray:
    """``value`` as the array the tensor ``tensor`` would hold, or INVALID_ARG naming ``key``."""
    given = value

    def wrong(kind: str) -> ServingError:
        return ServingError(INVALID_ARG, f"{SAMPLING_PARAMETERS_INPUT}: {key} must be {kind}, "
                                         f"got {given!r}")
    if isinstance(value, str) and tensor not in ("stop_words", "lora_name"):
        value = _from_string(value)
    if tensor in ("max_tokens", "top_k", "seed", "min_length"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        if tensor == "seed" and not 0 <= value < 2**64:
            raise ServingError(INVALID_ARG, f"seed must be an integer in [0, 2^64), got {value}")
        if tensor != "seed" and not -2**31 <= value < 2**31:
            raise wrong("a 32-bit integer")
        return np.array([value], dtype=np.uint64 if tensor == "seed" else np.int64)
    if tensor in ("temperature", "top_p"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise wrong("a number")
        return np.array([value], dtype=np.float64)
    if tensor == "ignore_eos":
        if not isinstance(value, bool):
            raise wrong("true or false")
        return np.array([value])
    if tensor == "stop_words":
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise wrong("a string or a list of strings")
        return np.array([s.encode() for s in stops] or [b""], dtype=np.object_)
    if not isinstance(value, str):  # lora_name
        raise wrong("a string")
    return np.array([value.encode()], dtype=np.object_)


def _from_string(text: str) -> Any:
    """A number or boolean written as a string, else the string (refused by its type check)."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(lowered)
        except ValueError:
            pass
    return text


def overlay(get: TensorGetter) -> TensorGetter:
    """``get`` with the values of the request's ``sampling_parameters`` (if any) added under
    their tensor names. A value given both ways must be equal."""
    raw = get(SAMPLING_PARAMETERS_INPUT)
    if raw is None:
        return get
    if raw.size != 1:
        raise ServingError(INVALID_ARG, f"input '{SAMPLING_PARAMETERS_INPUT}' must hold exactly one "
                                        f"value, got shape {list(raw.shape)}")
    params = SamplingParameters.parse(decode_utf8(SAMPLING_PARAMETERS_INPUT, raw.reshape(-1)[0]))

    def merged(name: str) -> np.ndarray | None:
        tensor = get(name)
        value = params.values.get(name)
        if value is None:
            return tensor
        if tensor is not None and not _same(tensor, value):
            raise ServingError(INVALID_ARG, f"'{name}' is given both as an input and in "
                                            f"{SAMPLING_PARAMETERS_INPUT}, with different values")
        return value

    return merged


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    def norm(arr: np.ndarray) -> list:
        return [v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v
                for v in arr.reshape(-1)]
    return norm(a) == norm(b)
