"""Adapter management and introspection, run in the engine model's process."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import INVALID_ARG, ServingError, error_from_exception
from .inputs import TensorGetter, get_str
from .router import StreamRouter

ADAPTER_ACTIONS = ("list", "load", "unload", "describe", "resolve", "stats", "abort")


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
