"""S-LoRA engine: many LoRA adapters of one base model, batched over one unified page pool."""

from .adapter_registry import AdapterInfo
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

__all__ = [
    "AdapterBusyError", "AdapterExistsError", "AdapterInfo", "AdapterLoadError",
    "AdapterNotFoundError", "Engine", "EngineConfig", "EngineOverloadedError", "EngineStats",
    "InvalidRequestError", "RequestOutput", "SLoRAError", "SamplingParams",
]
