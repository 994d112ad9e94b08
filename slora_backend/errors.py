"""Errors the engine raises at its public boundary. Each message says what was wrong."""

from __future__ import annotations


class SLoRAError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidRequestError(SLoRAError, ValueError):
    """A request or sampling parameter is out of range (maps to INVALID_ARG)."""


class AdapterNotFoundError(SLoRAError, LookupError):
    """No adapter is registered, or can be found under the adapter root, by that name (NOT_FOUND)."""

    def __str__(self) -> str:  # LookupError would quote the message like a dict key
        return str(self.args[0]) if self.args else ""


class AdapterLoadError(SLoRAError, ValueError):
    """An adapter was refused: wrong format, wrong base model, outside the root, corrupt files."""


class AdapterExistsError(AdapterLoadError):
    """An adapter of that name is already registered (ALREADY_EXISTS)."""


class AdapterBusyError(SLoRAError, RuntimeError):
    """An adapter cannot be unloaded while requests use it (UNAVAILABLE)."""


class EngineOverloadedError(SLoRAError, RuntimeError):
    """The request queue is full; try again later (UNAVAILABLE)."""


class EngineClosedError(SLoRAError, RuntimeError):
    """The engine was closed; it takes no more work (UNAVAILABLE)."""
