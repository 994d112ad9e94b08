"""The adapter lifecycle: disk -> host memory -> GPU pool pages, behind ``AdapterManager``.

One module per tier or step (see ``manager.py`` for the path of a ``lora_name``):

- ``names``: the adapter name rule and paths under the adapter root (no torch: the
  ``slora_adapters`` Triton model imports it).
- ``registry``: names -> directories, ``registry.json``, ``AdapterInfo`` (disk tier).
- ``validation``: a PEFT LoRA directory -> ``AdapterEntry``, or a refusal naming why.
- ``reader``: a safetensors file -> the packed rows pool pages hold.
- ``host_store``: entries and host-memory weights under a byte budget (host tier).
- ``host_reads``: reads disk -> host on helper threads, ahead of requests.
- ``gpu_cache``: which adapters are resident in the pool, pins, eviction (GPU tier).
- ``copier``: host -> pool pages, off the engine thread.
- ``tables``: each resident adapter's rows of the LoRA kernel tables.

Names are imported on first use (PEP 562), so ``import slora_backend.adapters.names`` loads no
torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AdapterManager": ".manager",
    "AdapterInfo": ".registry",
    "AdapterEntry": ".validation",
    "InvalidAdapterNameError": ".names",
    "check_adapter_name": ".names",
}

__all__ = [
    "AdapterEntry", "AdapterInfo", "AdapterManager", "InvalidAdapterNameError", "check_adapter_name",
]

if TYPE_CHECKING:
    from .manager import AdapterManager
    from .names import InvalidAdapterNameError, check_adapter_name
    from .registry import AdapterInfo
    from .validation import AdapterEntry


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
