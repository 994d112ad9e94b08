"""S-LoRA engine: many LoRA adapters of one base model, batched over one unified page pool.

The names below are imported on first use, so that a process importing only a torch-free part
of the package (the adapter model's stub, the launcher) does not load torch.
"""

from __future__ import annotations

from .lazy_exports import lazy_exports

_EXPORTS = {
    "AdapterInfo": ".adapters.registry",
    "EngineConfig": ".config", "SamplingParams": ".config",
    "Engine": ".engine", "EngineStats": ".engine",
    "AdapterBusyError": ".errors", "AdapterExistsError": ".errors", "AdapterLoadError": ".errors",
    "AdapterNotFoundError": ".errors", "EngineOverloadedError": ".errors",
    "InvalidRequestError": ".errors", "SLoRAError": ".errors",
    "RequestOutput": ".request",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
