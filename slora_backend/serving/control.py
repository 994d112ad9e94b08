"""Adapter management and introspection actions: parsed and guarded in the adapter model's
process (``parse_adapter_action``, ``AdminToken``, ``AdapterNames``), run in the engine model's
(``ControlHandler``)."""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapters.names import REGISTRY_FILE, adapter_dir, check_adapter_name, fs_path, real_path
from . import vllm_format
from .errors import INVALID_ARG, NOT_FOUND, UNAVAILABLE, ServingError, error_from_exception
from .inputs import TensorGetter, get_str

if TYPE_CHECKING:
    from .router import StreamRouter

ADAPTER_ACTIONS = ("list", "load", "unload", "describe", "resolve", "stats", "abort")
ADMIN_ACTIONS = ("load", "unload", "abort")  # the actions an admin token guards
ADMIN_TOKEN_ENV = "SLORA_ADMIN_TOKEN"
ADMIN_TOKEN_INPUT = "admin_token"


@dataclass(frozen=True)
class ControlRequest:
    action: str
    lora_name: str | None = None
    lora_path: str | None = None
    request_id: str | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in self.__dict__.items() if v is not None})

    @classmethod
    def from_json(cls, raw: str) -> ControlRequest:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ServingError(INVALID_ARG, f"control request is not JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("action"), str):
            raise ServingError(INVALID_ARG, "control request needs an 'action' string")
        unknown = set(data) - {"action", "lora_name", "lora_path", "request_id"}
        if unknown:
            raise ServingError(INVALID_ARG, f"control request has unknown keys {sorted(unknown)}")
        return cls(**data)


def parse_adapter_action(get: TensorGetter) -> ControlRequest:
    """Inputs of ``slora_adapters`` -> a control request. A missing action means ``resolve``
    (what the ``slora`` ensemble's adapter step asks)."""
    action = get_str(get, "action") or "resolve"
    if action == "resolve":  # the ensemble's step: lora_name may come inside sampling_parameters
        get = vllm_format.overlay(get)
    if action not in ADAPTER_ACTIONS:
        raise ServingError(
            INVALID_ARG, f"unknown action {action!r}; expected one of {', '.join(ADAPTER_ACTIONS)}"
        )
    lora_name = get_str(get, "lora_name") or None
    lora_path = get_str(get, "lora_path") or None
    request_id = get_str(get, "request_id") or None
    if action in ("load", "unload", "describe") and not lora_name:
        raise ServingError(INVALID_ARG, f"action '{action}' needs the input 'lora_name'")
    if action == "abort" and not request_id:
        raise ServingError(INVALID_ARG, "action 'abort' needs the input 'request_id'")
    return ControlRequest(action, lora_name, lora_path, request_id)


@dataclass(frozen=True)
class AdminToken:
    """The guard of ``ADMIN_ACTIONS``. With a token set, a request naming one of them must carry
    that token in the input ``admin_token`` and is refused with UNAVAILABLE otherwise (as
    Triton refuses a restricted API); without one, every action is open. Generation, the
    ensemble's adapter step and the read-only actions are never guarded. The token comes from
    the environment of the server (``SLORA_ADMIN_TOKEN``), never from the model repository."""

    token: str | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> AdminToken:
        return cls(environ.get(ADMIN_TOKEN_ENV) or None)

    def check(self, action: str, get: TensorGetter) -> None:
        if self.token is None or action not in ADMIN_ACTIONS:
            return
        given = get_str(get, ADMIN_TOKEN_INPUT)
        if not given:
            raise ServingError(UNAVAILABLE, f"action '{action}' is restricted on this server: "
                                            f"send the admin token in the input '{ADMIN_TOKEN_INPUT}' "
                                            "(the request has none)")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise ServingError(UNAVAILABLE, f"action '{action}' is restricted on this server: the "
                                            f"input '{ADMIN_TOKEN_INPUT}' is not the admin token")


class AdapterNames:
    """The ``slora`` ensemble's adapter step, answered in the adapter model's own process.

    A name passes when ``registry.json`` under the adapter root lists it or when it names an
    adapter directory inside the root (the engine registers it on first use); ``check`` raises
    NOT_FOUND for anything else, and the adapter model then asks the engine, whose answer is
    final. The engine step still validates the adapter itself (a corrupt file, another base
    model) and answers such a request with its own error. The check stays local: a BLS call per
    request crashes the adapter model's stub under load (docs/serving.md).
    """

    def __init__(self, root: Path) -> None:
        self.root = real_path(root)
        self._registered: tuple[float, frozenset[str]] = (-1.0, frozenset())

    def check(self, name: str) -> dict[str, Any]:
        """Raises NOT_FOUND, saying why, for a name that breaks the name rule
        (``adapters.names``, the engine's own) or that no adapter here has."""
        try:
            check_adapter_name(name)
        except ValueError as e:
            raise ServingError(NOT_FOUND, str(e)) from None
        if name in self._registry():
            return {"name": name, "registered": True}
        if adapter_dir(self.root, name) is not None:  # '..' and symlinks resolved, inside the root
            return {"name": name, "registered": False}
        raise ServingError(NOT_FOUND, f"adapter {name!r} is not registered and {self.root} has "
                                      "no adapter directory of that name")

    def _registry(self) -> frozenset[str]:
        """Registered names, re-read when the engine rewrites the file."""
        file = fs_path(self.root / REGISTRY_FILE)  # (UTF-8 whatever this process's locale)
        try:
            mtime = os.stat(file).st_mtime
        except OSError:
            return frozenset()
        if mtime != self._registered[0]:
            try:
                with open(file, encoding="utf-8") as f:
                    names = frozenset(json.load(f).get("adapters", {}))
            except (OSError, ValueError, AttributeError):
                names = frozenset()
            self._registered = (mtime, names)
        return self._registered[1]


@dataclass
class ControlHandler:
    """Runs control actions on the engine (in the engine model's process)."""

    engine: Any
    router: StreamRouter | None = None
    extra_stats: Callable[[], Mapping[str, Any]] = field(default=lambda: {})

    def handle(self, req: ControlRequest) -> dict[str, Any]:
        try:
            return self._dispatch(req)
        except ServingError:
            raise
        except Exception as e:
            raise error_from_exception(e) from None

    def _dispatch(self, req: ControlRequest) -> dict[str, Any]:
        e = self.engine
        if req.action == "list":
            return {"adapters": [a.to_dict() for a in e.list_adapters()]}
        if req.action == "describe":
            return e.describe_adapter(req.lora_name).to_dict()
        if req.action == "load":
            # The path defaults to the adapter's name: <adapter_root>/<name>.
            return e.load_adapter(req.lora_name, req.lora_path or req.lora_name).to_dict()
        if req.action == "unload":
            e.unload_adapter(req.lora_name)
            return {"unloaded": req.lora_name}
        if req.action == "resolve":
            if not req.lora_name:
                return {"name": None, "base_model": True}
            return e.resolve_adapter(req.lora_name).to_dict()
        if req.action == "stats":
            stats = e.stats().to_dict()
            stats["in_flight"] = self.router.num_in_flight() if self.router else 0
            stats.update(self.extra_stats())
            return stats
        if req.action == "abort":
            n = self.router.abort_client_id(req.request_id) if self.router else 0
            return {"request_id": req.request_id, "aborted": n}
        raise ServingError(INVALID_ARG, f"unknown action {req.action!r}")
