"""``engine.json`` (``engine_json``) -> ``EngineConfig`` and the serving layer's settings.

Rules: every key is an ``EngineConfig`` field or one of ``SERVING_KEYS``; an unknown key is
refused with the known ones listed. ``null`` means the default. Values keep their JSON types:
an int field takes an integer, a float field a number, a bool field ``true``/``false``, a string
field a string; anything else is a ValueError naming the key, the value and the type expected.
``device``/``dtype`` ``auto`` are resolved here (CUDA when torch sees one; float16 on CUDA).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import EngineConfig
from .engine_json import DEFAULT_MODEL, PATH_KEYS, SERVING_KEYS, resolve_path

_TYPE_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


@dataclass(frozen=True)
class ServingSettings:
    engine: EngineConfig
    max_tokens_limit: int | None
    metrics_interval_s: float
    stream_interval: int = 1
    engine_process: bool = True
    engine_restarts: int = 3


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(EngineConfig)}


def _typed(key: str, value: Any, type_name: str) -> Any:
    """``value`` checked against ``type_name`` ("int | None", "float", ...)."""
    base = type_name.replace(" | None", "").replace("Optional[", "").rstrip("]")
    if base == "bool":
        ok = isinstance(value, bool)
    elif base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif base == "str":
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ValueError(f"engine.json: {key!r} must be {_TYPE_WORDS.get(base, base)} or null, "
                         f"got {value!r}")
    return value


def resolve_auto(device: str, dtype: str) -> tuple[str, str]:
    """``auto`` device: CUDA when torch sees one; ``auto`` dtype: float16 on CUDA, else float32."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, dtype


def settings_from_json(data: Mapping[str, Any], base_dir: Path) -> ServingSettings:
    """Raises ValueError naming the key that is wrong."""
    types = _field_types()
    unknown = sorted(set(data) - set(types) - set(SERVING_KEYS))
    if unknown:
        raise ValueError(f"engine.json: unknown keys {unknown}; known: {sorted(types)} "
                         f"and {sorted(SERVING_KEYS)}")
    kwargs: dict[str, Any] = {}
    serving: dict[str, Any] = {}
    for key, value in data.items():
        if value is None:
            continue
        if key in SERVING_KEYS:
            serving[key] = _typed(key, value, SERVING_KEYS[key][0])
            continue
        value = _typed(key, value, types[key])
        kwargs[key] = resolve_path(key, value, base_dir) if key in PATH_KEYS else value
    if "base_model" not in kwargs:  # not setdefault: resolving the default converts SmolLM2
        kwargs["base_model"] = resolve_path("base_model", DEFAULT_MODEL, base_dir)
    kwargs["device"], kwargs["dtype"] = resolve_auto(str(kwargs.get("device", "auto")),
                                                     str(kwargs.get("dtype", "auto")))
    for key, (_, default, _) in SERVING_KEYS.items():
        serving.setdefault(key, default)
    for key, low in (("max_tokens_limit", 1), ("stream_interval", 1), ("engine_restarts", 0)):
        if serving[key] is not None and serving[key] < low:
            raise ValueError(f"engine.json: {key!r} must be >= {low}, got {serving[key]}")
    if serving["metrics_interval_s"] <= 0:
        raise ValueError(f"engine.json: 'metrics_interval_s' must be > 0, "
                         f"got {serving['metrics_interval_s']}")
    try:
        engine = EngineConfig(**kwargs)
    except ValueError as e:
        raise ValueError(f"engine.json: {e}") from None
    return ServingSettings(engine=engine, **serving)
