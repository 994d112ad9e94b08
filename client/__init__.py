"""slora_client: a thin client of a slora-triton server over tritonclient's gRPC protocol.

- ``SLoRAClient.generate(prompt, lora_name=...)``: a streaming iterator of text deltas;
  ``AsyncSLoRAClient`` the asyncio variant. Many generations share one connection.
- Adapter management: ``list_adapters``, ``load_adapter``, ``unload_adapter``,
  ``describe_adapter``; ``stats`` (engine and pool); ``abort(request_id)``.
- Server errors raise ``SLoRAClientError`` (``.code`` such as ``NOT_FOUND`` / ``INVALID_ARG``,
  ``.message``).
- CLI: ``slora-client generate "..." --lora pirate``, ``slora-client adapters list``.
"""

from .aio import AsyncGeneration, AsyncSLoRAClient
from .client import Completion, Generation, SLoRAClient
from .errors import (
    CancelledError,
    InvalidArgumentError,
    NotFoundError,
    SLoRAClientError,
    UnavailableError,
)

__all__ = [
    "AsyncGeneration", "AsyncSLoRAClient", "CancelledError", "Completion", "Generation",
    "InvalidArgumentError", "NotFoundError", "SLoRAClient", "SLoRAClientError",
    "UnavailableError",
]
