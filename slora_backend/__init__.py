"""S-LoRA engine: many LoRA adapters of one base model, batched over one unified page pool.

The names below are imported on first use, so that a process importing only a torch-free part
of the package (the adapter model's stub, the launcher) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdapterInfo": ".adapter_registry",
    "EngineConfig": ".config", "SamplingParams": ".config",
    "Engine": ".engine", "EngineStats": ".engine",
    "AdapterBusyError": ".errors", "AdapterExistsError": ".errors", "AdapterLoadError": ".errors",
    "AdapterNotFoundError": ".errors", "EngineOverloadedError": ".errors",
    "InvalidRequestError": ".errors", "SLoRAError": ".errors",
    "RequestOutput": ".request",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
