"""The engine config file of a model repository: ``slora_engine/1/engine.json``.

One JSON object, read by both Python models: keys named like an ``EngineConfig`` field set that
field, the others are the serving layer's own (``SERVING_KEYS``). ``null`` means "the default";
an unknown key is an error naming it (``settings.settings_from_json`` checks every key and type).
Relative paths are taken from the model repository's parent directory, so the committed
repository finds ``demo_adapters/`` beside it.

This module imports no torch: the adapter model's stub reads the adapter root from here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENGINE_MODEL = "slora_engine"
ENGINE_VERSION = "1"
ENGINE_JSON = "engine.json"
DEFAULT_MODEL = "smollm2"  # the embedded SmolLM2-135M-Instruct (see default_model.py)
PATH_KEYS = ("base_model", "tokenizer", "adapter_root", "hf_hub_cache")

# The serving layer's keys: (type, default, meaning). Types as EngineConfig's fields spell them.
SERVING_KEYS: dict[str, tuple[str, Any, str]] = {
    "engine_process": ("bool", True, "run the engine in a child process of its own"),
    "engine_restarts": ("int", 3, "times a crashed engine process is restarted before the model "
                                  "stays failed"),
    "max_tokens_limit": ("int | None", None, "largest max_tokens a request may ask for "
                                             "(default: the context length)"),
    "metrics_interval_s": ("float", 0.5, "seconds between metric updates"),
    "stream_interval": ("int", 1, "new tokens per streamed response"),
}


def engine_json_path(repository: str | Path) -> Path:
    """Where the engine config of the model repository at ``repository`` lives."""
    return Path(repository) / ENGINE_MODEL / ENGINE_VERSION / ENGINE_JSON


def read_engine_json(path: str | Path) -> dict[str, Any]:
    """The file's object; ValueError naming the file when it is missing or not a JSON object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: the engine config file is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold one JSON object of settings, got {type(data).__name__}")
    return data


def write_engine_json(path: str | Path, data: Mapping[str, Any]) -> None:
    Path(path).write_text(json.dumps(dict(data), indent=2) + "\n", encoding="utf-8")


def resolve_path(key: str, raw: str, base_dir: Path) -> str:
    """A path setting as the engine takes it: ``random:<shape>`` unchanged, the default model's
    name -> its cached directory (converted on first use), relative -> under ``base_dir``."""
    if key == "base_model" and raw == DEFAULT_MODEL:
        from ..default_model import smollm2_dir

        return str(smollm2_dir())
    if raw.startswith("random:"):
        return raw
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = (base_dir / path).resolve()
    return str(path)


def adapter_root_setting(data: Mapping[str, Any], base_dir: Path) -> Path | None:
    """The ``adapter_root`` setting as an absolute path (relative to ``base_dir``), or None."""
    raw = data.get("adapter_root")
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise ValueError(f"engine.json: 'adapter_root' must be a string or null, got {raw!r}")
    return Path(resolve_path("adapter_root", raw, base_dir))
