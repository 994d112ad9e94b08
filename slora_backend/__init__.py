"""S-LoRA engine: many LoRA adapters of one base model, batched over one unified page pool.

The public names below are imported on first use (PEP 562), so that light modules such as
``slora_backend.adapters.names`` and ``slora_backend.errors`` can be imported without torch (the
``slora_adapters`` Triton model does so).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AdapterInfo": ".adapters.registry",
    "EngineConfig": ".config",
    "SamplingParams": ".config",
    "Engine": ".engine",
    "EngineStats": ".engine",
    "AdapterBusyError": ".errors",
    "AdapterExistsError": ".errors",
    "AdapterLoadError": ".errors",
    "AdapterNotFoundError": ".errors",
    "EngineOverloadedError": ".errors",
    "InvalidRequestError": ".errors",
    "SLoRAError": ".errors",
    "RequestOutput": ".request",
}

__all__ = [
    "AdapterBusyError", "AdapterExistsError", "AdapterInfo", "AdapterLoadError",
    "AdapterNotFoundError", "Engine", "EngineConfig", "EngineOverloadedError", "EngineStats",
    "InvalidRequestError", "RequestOutput", "SLoRAError", "SamplingParams",
]

if TYPE_CHECKING:
    from .adapters.registry import AdapterInfo
    from .config import EngineConfig, SamplingParams
    from .engine import Engine, EngineStats
    from .errors import (
        AdapterBusyError,
        AdapterExistsError,
        AdapterLoadError,
        AdapterNotFoundError,
        EngineOverloadedError,
        InvalidRequestError,
        SLoRAError,
    )
    from .request import RequestOutput


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
