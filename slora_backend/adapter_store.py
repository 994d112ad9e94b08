"""Every registered adapter: validated metadata always, weights in host memory while used.

Registration reads only ``adapter_config.json`` and the safetensors header (names, shapes,
dtypes), so it costs the same whether 5 or 5000 adapters are registered. Weights are read on
first use and kept in (pinned) host memory under a byte budget, dropped least-recently-used
back to disk when the budget is exceeded.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from .adapter_files import DTYPES, LORA_KEY, AdapterFileReader
from .adapter_paths import CONFIG_FILE
from .batch import LORA_MODULES, MODULE_INDEX
from .errors import AdapterExistsError, AdapterLoadError, AdapterNotFoundError
from .layout import AdapterPlan, PoolLayout

WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass
class AdapterEntry:
    """One registered adapter. ``ranks`` maps each target module to its rank."""

    name: str
    path: Path
    ranks: dict[str, int]
    lora_alpha: float
    use_rslora: bool
    plan: AdapterPlan
    size_bytes: int  # weights at the engine's dtype
    total_requests: int = 0
    weights: torch.Tensor | None = field(default=None, repr=False)  # [layers, plan.used_elements]

    # ``ranks`` does not change after registration; a step asks for these once per request
    # (S1 at n = 2000: ~100k calls in 15 s), so they are computed once.
    @cached_property
    def rank(self) -> int:
        return max(self.ranks.values())

    @cached_property
    def targets(self) -> frozenset[int]:
        """Indices (``batch.MODULE_INDEX``) of the modules this adapter has LoRA on."""
        return frozenset(MODULE_INDEX[m] for m in self.ranks)

    @cached_property
    def scaling(self) -> float:
        r = self.rank
        return self.lora_alpha / math.sqrt(r) if self.use_rslora else self.lora_alpha / r


class AdapterStore:
    """Registry of adapters, validated against one base model's shapes."""

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

    def register(self, name: str, path: Path) -> AdapterEntry:
        """Validate the adapter at ``path`` and register it as ``name`` (weights stay on disk)."""
        if not name or "/" in name or name.strip() != name:
            raise AdapterLoadError(f"adapter name {name!r} must be non-empty, without '/' or spaces")
        if name in self._entries:
            raise AdapterExistsError(f"adapter {name!r} is already registered; unload it first")
        entry = self._validate(name, path)
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

    # ---- validation -------------------------------------------------------------------------

    def _validate(self, name: str, path: Path) -> AdapterEntry:
        if not path.is_dir():
            raise AdapterLoadError(f"adapter {name!r}: {path} is not a directory")
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise AdapterLoadError(f"adapter {name!r}: {CONFIG_FILE} is missing in {path}")
        weights_path = path / WEIGHTS_FILE
        if not weights_path.is_file():
            pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
            why = f" (found {', '.join(pickles)}: pickled weights are refused)" if pickles else ""
            raise AdapterLoadError(f"adapter {name!r}: {WEIGHTS_FILE} is missing{why}; safetensors only")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterLoadError(f"adapter {name!r}: {CONFIG_FILE} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise AdapterLoadError(f"adapter {name!r}: {CONFIG_FILE} must hold a JSON object")
        alpha, use_rslora = self._check_config(name, config)
        shapes = self._read_header(name, weights_path)
        ranks = self._check_shapes(name, shapes)
        plan = self.layout.plan_adapter(ranks)
        size = plan.used_elements * self.layout.spec.num_layers * torch.finfo(self.dtype).bits // 8
        return AdapterEntry(name, path, ranks, alpha, use_rslora, plan, size)

    def _check_config(self, name: str, config: dict) -> tuple[float, bool]:
        def refuse(msg: str) -> AdapterLoadError:
            return AdapterLoadError(f"adapter {name!r}: {msg}")

        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise refuse(f"peft_type {peft_type!r} is not supported; only LORA")
        if config.get("use_dora"):
            raise refuse("DoRA adapters (use_dora=true) are not supported")
        if config.get("modules_to_save"):
            raise refuse(f"modules_to_save {config['modules_to_save']} is not supported")
        if config.get("bias", "none") != "none":
            raise refuse(f"LoRA bias {config['bias']!r} is not supported; only 'none'")
        for key in ("rank_pattern", "alpha_pattern"):
            if config.get(key):
                raise refuse(f"{key} is not supported (one rank and alpha per adapter)")
        if config.get("layers_to_transform") is not None:
            raise refuse("layers_to_transform is not supported (LoRA on every layer)")
        targets = config.get("target_modules")
        if isinstance(targets, str):
            raise refuse(f"target_modules as a regex ({targets!r}) is not supported; list modules")
        unknown = [t for t in targets or [] if t not in LORA_MODULES]
        if unknown:
            raise refuse(f"target modules {unknown} are not supported; allowed: {list(LORA_MODULES)}")
        alpha = config.get("lora_alpha", 8)
        if not isinstance(alpha, (int, float)) or alpha <= 0:
            raise refuse(f"lora_alpha must be a positive number, got {alpha!r}")
        return float(alpha), bool(config.get("use_rslora", False))

    def _read_header(self, name: str, path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Tensor name -> (dtype, shape) from the safetensors header, without reading the data."""
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100 * 2**20:
                    raise ValueError(f"header length {n} is implausible")
                header = json.loads(f.read(n))
                data_len = os.fstat(f.fileno()).st_size - 8 - n
            shapes = {}
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                if not 0 <= start <= end <= data_len:
                    raise ValueError(f"tensor {key} lies outside the file")
                shapes[key] = (info["dtype"], tuple(info["shape"]))
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise AdapterLoadError(f"adapter {name!r}: {path.name} is corrupt: {e}") from None
        return shapes

    def _check_shapes(self, name: str, shapes: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, int]:
        spec, dims = self.layout.spec, self.layout.module_dims
        found: dict[str, set[int]] = {}
        ranks: dict[str, int] = {}
        for key, (dtype, shape) in shapes.items():
            m = LORA_KEY.match(key)
            if m is None:
                raise AdapterLoadError(
                    f"adapter {name!r}: tensor {key!r} is not a LoRA A/B weight of a supported "
                    "module (DoRA magnitudes, biases and saved modules are refused)"
                )
            layer, module, which = int(m.group(1)), m.group(2), m.group(3)
            if dtype not in DTYPES:
                raise AdapterLoadError(f"adapter {name!r}: tensor {key!r} has dtype {dtype}")
            if layer >= spec.num_layers:
                raise AdapterLoadError(
                    f"adapter {name!r}: has layer {layer} but the base model has {spec.num_layers} layers"
                )
            in_dim, out_dim = dims[module]
            if len(shape) != 2:
                raise AdapterLoadError(f"adapter {name!r}: tensor {key!r} has shape {list(shape)}")
            rank = shape[0] if which == "A" else shape[1]
            want = (rank, in_dim) if which == "A" else (out_dim, rank)
            if shape != want:
                raise AdapterLoadError(
                    f"adapter {name!r}: {key} has shape {list(shape)}, the base model needs "
                    f"{list(want)} (adapter for another base model?)"
                )
            if ranks.setdefault(module, rank) != rank:
                raise AdapterLoadError(f"adapter {name!r}: module {module} has differing ranks")
            found.setdefault(f"{module}.{which}", set()).add(layer)
        if not ranks:
            raise AdapterLoadError(f"adapter {name!r}: no LoRA weights found")
        for module in ranks:
            for which in "AB":
                layers = found.get(f"{module}.{which}", set())
                if len(layers) != spec.num_layers:
                    raise AdapterLoadError(
                        f"adapter {name!r}: {module}.lora_{which} covers {len(layers)} layers, "
                        f"the base model has {spec.num_layers}"
                    )
        if min(ranks.values()) < 1:
            raise AdapterLoadError(f"adapter {name!r}: rank 0 is not a valid LoRA rank")
        return {m: ranks[m] for m in LORA_MODULES if m in ranks}

    def _read_weights(self, entry: AdapterEntry) -> torch.Tensor:
        """Read A and B^T rows and pack them in the plan's row order, ``[layers, used]``."""
        try:
            packed = self._reader.read(entry.path / WEIGHTS_FILE, entry.plan, self.dtype)
        except Exception as e:  # a file damaged after registration: any parsing error
            raise AdapterLoadError(f"adapter {entry.name!r}: cannot read weights: {e}") from None
        if self.pin_memory and torch.cuda.is_available():
            packed = packed.pin_memory()
        return packed
