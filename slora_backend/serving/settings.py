"""``config.pbtxt`` parameters of the engine model -> ``EngineConfig`` and serving limits.

Every parameter is a string (``parameters { key: "dtype" value { string_value: "float16" } }``).
Keys named like an ``EngineConfig`` field set that field; the others are the serving layer's own
(``SERVING_KEYS``). An unknown key is an error, so a typo does not pass silently. An empty value
means "the default". Relative paths are taken from the model repository's parent directory, so
the committed repository finds ``demo_adapters/`` beside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config import EngineConfig

DEFAULT_MODEL = "smollm2"  # the embedded SmolLM2-135M-Instruct (see default_model.py)
PATH_KEYS = ("base_model", "tokenizer", "adapter_root")
SERVING_KEYS = {
    "engine_process": "run the engine in its own process (default true; see serving.EngineProcess)",
    "max_tokens_limit": "largest max_tokens a request may ask for (default: the context length)",
    "metrics_interval_s": "seconds between metric updates (default 0.5)",
    "python_path": "extra import roots for the stub (os.pathsep-separated)",
    "stream_interval": "new tokens per streamed response (default 1; see serving.StreamRouter)",
}


@dataclass(frozen=True)
class ServingSettings:
    engine: EngineConfig
    max_tokens_limit: int | None
    metrics_interval_s: float
    stream_interval: int = 1
    engine_process: bool = True


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(EngineConfig)}


def _convert(key: str, raw: str, type_name: str) -> object:
    base = type_name.replace(" | None", "").replace("Optional[", "").rstrip("]")
    try:
        if base == "bool":
            low = raw.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return low in ("true", "1", "yes")
        if base == "int":
            return int(raw)
        if base == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"parameter {key!r}: {raw!r} is not a valid {base}") from None
    return raw


def adapter_root_parameter(params: Mapping[str, str], base_dir: Path) -> Path | None:
    """The ``adapter_root`` parameter as an absolute path (relative to ``base_dir``), or None."""
    raw = params.get("adapter_root", "").strip()
    return Path(_resolve_path("adapter_root", raw, base_dir)) if raw else None


def _resolve_path(key: str, raw: str, base_dir: Path) -> str:
    if key == "base_model" and raw == DEFAULT_MODEL:
        from ..default_model import smollm2_dir

        return str(smollm2_dir())
    if raw.startswith("random:"):
        return raw
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = (base_dir / path).resolve()
    return str(path)


def resolve_auto(device: str, dtype: str) -> tuple[str, str]:
    """``auto`` device: CUDA when torch sees one; ``auto`` dtype: float16 on CUDA, else float32."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, dtype


def settings_from_parameters(params: Mapping[str, str], base_dir: Path) -> ServingSettings:
    """Raises ValueError naming the parameter that is wrong."""
    types = _field_types()
    unknown = sorted(set(params) - set(types) - set(SERVING_KEYS))
    if unknown:
        raise ValueError(
            f"unknown parameters {unknown}; known: {sorted(types)} and {sorted(SERVING_KEYS)}"
        )
    kwargs: dict[str, object] = {}
    for key, raw in params.items():
        if key in SERVING_KEYS or raw.strip() == "":
            continue
        value = _resolve_path(key, raw, base_dir) if key in PATH_KEYS else raw
        kwargs[key] = _convert(key, value, types[key])
    if "base_model" not in kwargs:  # not setdefault: resolving the default converts SmolLM2
        kwargs["base_model"] = _resolve_path("base_model", DEFAULT_MODEL, base_dir)
    device, dtype = resolve_auto(str(kwargs.get("device", "auto")), str(kwargs.get("dtype", "auto")))
    kwargs["device"], kwargs["dtype"] = device, dtype
    def serving_value(key: str, type_name: str, default: object) -> object:
        raw = params.get(key, "").strip()
        return _convert(key, raw, type_name) if raw else default

    settings = ServingSettings(
        engine=EngineConfig(**kwargs),
        max_tokens_limit=serving_value("max_tokens_limit", "int", None),
        metrics_interval_s=serving_value("metrics_interval_s", "float", 0.5),
        stream_interval=serving_value("stream_interval", "int", 1),
        engine_process=serving_value("engine_process", "bool", True),
    )
    if settings.max_tokens_limit is not None and settings.max_tokens_limit < 1:
        raise ValueError(f"parameter 'max_tokens_limit' must be >= 1, got {settings.max_tokens_limit}")
    if settings.stream_interval < 1:
        raise ValueError(f"parameter 'stream_interval' must be >= 1, got {settings.stream_interval}")
    if settings.metrics_interval_s <= 0:
        raise ValueError(f"parameter 'metrics_interval_s' must be > 0, got {settings.metrics_interval_s}")
    return settings
