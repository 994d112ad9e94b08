"""The host tier: every registered adapter's entry, and weights in host memory while used.

Entries (validated metadata, ``validation.py``) stay for as long as the adapter is registered.
Weights are read on first use (``reader.py``) and kept in (pinned) host memory under a byte
budget, dropped least-recently-used back to disk when the budget is exceeded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import AdapterExistsError, AdapterLoadError, AdapterNotFoundError
from ..layout import PoolLayout
from .hf_cache import is_hf_id
from .names import WEIGHTS_FILE, check_adapter_name
from .reader import AdapterFileReader
from .validation import AdapterEntry, AdapterValidator


class AdapterStore:
    """Registered adapters' entries (validated against one base model's shapes) and their
    weights in host memory."""

    def __init__(
        self, layout: PoolLayout, dtype: torch.dtype, host_budget_bytes: int, pin_memory: bool
    ) -> None:
        self.layout = layout
        self.dtype = dtype
        self.host_budget_bytes = host_budget_bytes
        self.pin_memory = pin_memory
        self._entries: dict[str, AdapterEntry] = {}
        self._host_lru: OrderedDict[str, None] = OrderedDict()  # adapters with weights in memory
        self.host_bytes = 0
        self.disk_loads = 0
        self._lock = threading.RLock()
        self._reader = AdapterFileReader(layout.spec.num_layers)
        self._validator = AdapterValidator(layout, dtype)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> AdapterEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise AdapterNotFoundError(f"adapter {name!r} is not registered") from None

    def register(self, name: str, path: Path, hf_id: bool = False) -> AdapterEntry:
        """Validate the adapter at ``path`` and register it as ``name`` (weights stay on disk).
        ``hf_id``: ``name`` is a Hugging Face id (``org/name``, ``hf_cache``), not a directory name."""
        if not (hf_id and is_hf_id(name)):
            check_adapter_name(name)
        if name in self._entries:
            raise AdapterExistsError(f"adapter {name!r} is already registered with path "
                                     f"{str(self._entries[name].path)!r}; unload it first")
        entry = self._validator.validate(name, path)
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self.drop_weights(name)
        del self._entries[name]

    def has_weights(self, name: str) -> bool:
        return self._entries[name].weights is not None

    def weights(self, name: str) -> torch.Tensor:
        """The adapter's packed rows ``[layers, used_elements]``, read from disk if not in memory.

        Thread-safe: the engine reads queued requests' adapters ahead on helper threads. The disk
        read runs outside the lock, so several adapters are read at once.
        """
        entry = self.get(name)
        packed = self._read_weights(entry) if entry.weights is None else None
        with self._lock:
            if entry.weights is None:  # (another thread may have read it meanwhile)
                entry.weights = packed
                self.host_bytes += packed.numel() * packed.element_size()
                self.disk_loads += 1
            self._host_lru[name] = None
            self._host_lru.move_to_end(name)
            self._shrink_host(keep=name)
            return entry.weights

    def drop_weights(self, name: str) -> None:
        with self._lock:
            self._drop_weights(name)

    def _drop_weights(self, name: str) -> None:
        entry = self._entries[name]
        if entry.weights is not None:
            self.host_bytes -= entry.weights.numel() * entry.weights.element_size()
            entry.weights = None
        self._host_lru.pop(name, None)

    @property
    def num_in_host(self) -> int:
        return len(self._host_lru)

    def _shrink_host(self, keep: str) -> None:
        while self.host_bytes > self.host_budget_bytes and len(self._host_lru) > 1:
            victim = next(iter(self._host_lru))
            if victim == keep:
                self._host_lru.move_to_end(victim)
                continue
            self._drop_weights(victim)

    def _read_weights(self, entry: AdapterEntry) -> torch.Tensor:
        """Read A and B^T rows and pack them in the plan's row order, ``[layers, used]``."""
        try:
            packed = self._reader.read(entry.path / WEIGHTS_FILE, entry.plan, self.dtype)
        except Exception as e:  # a file damaged after registration: any parsing error
            raise AdapterLoadError(f"adapter {entry.name!r}: cannot read weights: {e}") from None
        if self.pin_memory and torch.cuda.is_available():
            packed = packed.pin_memory()
        return packed
