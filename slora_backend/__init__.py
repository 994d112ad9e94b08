"""S-LoRA engine: many LoRA adapters of one base model, batched over one unified page pool."""

from .adapter_registry import AdapterInfo
from .config import EngineConfig, SamplingParams
from .engine import Engine, EngineStats
from .errors import (
    AdapterBusyError,
    AdapterLoadError,
    AdapterNotFoundError,
    InvalidRequestError,
    SLoRAError,
)
from .request import RequestOutput

__all__ = [
    "AdapterBusyError", "AdapterInfo", "AdapterLoadError", "AdapterNotFoundError", "Engine",
    "EngineConfig", "EngineStats", "InvalidRequestError", "RequestOutput", "SLoRAError",
    "SamplingParams",
]
