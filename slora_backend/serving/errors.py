"""Errors of the serving layer, each with the Triton error code it is reported under."""

from __future__ import annotations

from ..errors import (
    AdapterBusyError,
    AdapterExistsError,
    AdapterLoadError,
    AdapterNotFoundError,
    EngineOverloadedError,
    InvalidRequestError,
    SLoRAError,
)

# Triton error codes (pb_utils.TritonError.<name>) used here.
INVALID_ARG = "INVALID_ARG"
NOT_FOUND = "NOT_FOUND"
UNAVAILABLE = "UNAVAILABLE"
INTERNAL = "INTERNAL"
CANCELLED = "CANCELLED"
UNSUPPORTED = "UNSUPPORTED"
ALREADY_EXISTS = "ALREADY_EXISTS"
ERROR_CODES = (INVALID_ARG, NOT_FOUND, UNAVAILABLE, INTERNAL, CANCELLED, UNSUPPORTED, ALREADY_EXISTS)


class EngineProcessError(SLoRAError):
    """The engine process failed to start, is gone, is restarting, or stays failed."""


class ServingError(Exception):
    """An error with the Triton code it should be reported under."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    def wire_message(self) -> str:
        """The message as sent: prefixed with the code, because gRPC streams and the HTTP
        generate endpoints carry only an error *message*, not its code."""
        return f"{self.code}: {self.message}"


def error_from_exception(exc: BaseException) -> ServingError:
    """Map an engine exception to the Triton code a client can act on."""
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, AdapterNotFoundError):
        return ServingError(NOT_FOUND, str(exc))
    if isinstance(exc, (AdapterBusyError, EngineOverloadedError, EngineProcessError)):
        return ServingError(UNAVAILABLE, str(exc))
    if isinstance(exc, AdapterExistsError):
        return ServingError(ALREADY_EXISTS, str(exc))
    if isinstance(exc, (InvalidRequestError, AdapterLoadError)):
        return ServingError(INVALID_ARG, str(exc))
    if isinstance(exc, SLoRAError):
        return ServingError(INTERNAL, str(exc))
    return ServingError(INTERNAL, f"{type(exc).__name__}: {exc}")
