"""Triton errors as exceptions that keep the error code and the server's message."""

from __future__ import annotations

import re

# gRPC status names -> the Triton error code names the server uses.
_GRPC_TO_TRITON = {
    "INVALID_ARGUMENT": "INVALID_ARG",
    "UNIMPLEMENTED": "UNSUPPORTED",
    "OUT_OF_RANGE": "INVALID_ARG",
}
_CODE_PREFIX = re.compile(
    r"^(?:in ensemble '[^']*', )?"
    r"(INVALID_ARG|NOT_FOUND|UNAVAILABLE|INTERNAL|CANCELLED|UNSUPPORTED|ALREADY_EXISTS): "
)


class SLoRAClientError(Exception):
    """An error from the server (or the connection to it).

    ``code``: the Triton error code (``INVALID_ARG``, ``NOT_FOUND``, ``UNAVAILABLE``,
    ``INTERNAL``, ``CANCELLED``, ``UNSUPPORTED``, ...) or ``UNKNOWN`` when the server gave none;
    ``message``: what the server said, without the code prefix; ``raw``: the message as received.
    """

    def __init__(self, code: str, message: str, raw: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.raw = raw if raw is not None else message


class InvalidArgumentError(SLoRAClientError):
    pass


class NotFoundError(SLoRAClientError):
    pass


class UnavailableError(SLoRAClientError):
    pass


class CancelledError(SLoRAClientError):
    pass


_CLASSES = {
    "INVALID_ARG": InvalidArgumentError,
    "NOT_FOUND": NotFoundError,
    "UNAVAILABLE": UnavailableError,
    "CANCELLED": CancelledError,
}


def make_error(code: str, message: str, raw: str | None = None) -> SLoRAClientError:
    return _CLASSES.get(code, SLoRAClientError)(code, message, raw)


def from_message(raw: str, fallback_code: str = "UNKNOWN") -> SLoRAClientError:
    """Streams carry only a message: the serving models prefix it with the code
    (``"NOT_FOUND: adapter 'x' ..."``, behind Triton's ``"in ensemble 'slora', "``)."""
    m = _CODE_PREFIX.match(raw)
    if m:
        return make_error(m.group(1), raw[m.end():], raw)
    return make_error(fallback_code, raw, raw)


def from_grpc_error(error) -> SLoRAClientError:
    """A ``grpc.RpcError`` (unary calls keep the status code)."""
    status = error.code().name if hasattr(error, "code") and error.code() else "UNKNOWN"
    code = _GRPC_TO_TRITON.get(status, status)
    details = error.details() if hasattr(error, "details") else str(error)
    parsed = from_message(details or "", code)
    return parsed
