"""Adapter validation: a PEFT LoRA directory -> its registry entry, or a refusal naming why.

Reads only ``adapter_config.json`` and the safetensors header (tensor names, shapes, dtypes),
never the weights, so registering costs the same for 5 or 5000 adapters. An adapter is checked
against one base model: its modules, layers and shapes must fit, and its config must agree with
its tensors.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ..batch import LORA_MODULES, MODULE_INDEX
from ..errors import AdapterLoadError
from ..layout import AdapterPlan, PoolLayout
from .names import CONFIG_FILE, WEIGHTS_FILE
from .reader import DTYPES, LORA_KEY


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



class AdapterValidator:
    """Validates adapters against one pool layout (the base model's shapes) at one dtype."""

    def __init__(self, layout: PoolLayout, dtype: torch.dtype) -> None:
        self.layout = layout
        self.dtype = dtype

    def validate(self, name: str, path: Path) -> AdapterEntry:
        """The adapter at ``path`` as ``name``'s entry; raises ``AdapterLoadError`` naming the
        first problem found."""
        try:
            self._check_files(name, path)
        except OSError as e:  # e.g. a path too long for the file system
            raise AdapterLoadError(f"adapter {name!r}: cannot read {str(path)[:200]!r}: "
                                   f"{e.strerror or e}") from None
        config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        try:
            config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterLoadError(f"adapter {name!r}: {CONFIG_FILE} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise AdapterLoadError(f"adapter {name!r}: {CONFIG_FILE} must hold a JSON object")
        alpha, use_rslora = self._check_config(name, config)
        shapes = self._read_header(name, weights_path)
        ranks = self._check_shapes(name, shapes)
        self._check_config_rank(name, config, ranks)
        plan = self.layout.plan_adapter(ranks)
        size = plan.used_elements * self.layout.spec.num_layers * torch.finfo(self.dtype).bits // 8
        return AdapterEntry(name, path, ranks, alpha, use_rslora, plan, size)

    @staticmethod
    def _check_files(name: str, path: Path) -> None:
        if not path.is_dir():
            raise AdapterLoadError(f"adapter {name!r}: {path} is not a directory")
        if not (path / CONFIG_FILE).is_file():
            raise AdapterLoadError(f"adapter {name!r}: {CONFIG_FILE} is missing in {path}")
        if not (path / WEIGHTS_FILE).is_file():
            pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
            why = f" (found {', '.join(pickles)}: pickled weights are refused)" if pickles else ""
            raise AdapterLoadError(f"adapter {name!r}: {WEIGHTS_FILE} is missing{why}; safetensors only")

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
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise refuse(f"lora_alpha must be a positive finite number, got {alpha!r}")
        return float(alpha), bool(config.get("use_rslora", False))

    @staticmethod
    def _check_config_rank(name: str, config: dict, ranks: dict[str, int]) -> None:
        """The config's ``r`` (when given) must be every module's rank in the tensors: the
        scaling is ``lora_alpha / r``, so a config that disagrees would scale by the wrong rank
        (PEFT refuses such an adapter when it loads the tensors)."""
        if "r" not in config:
            return
        r = config["r"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise AdapterLoadError(f"adapter {name!r}: {CONFIG_FILE} r must be a positive integer, "
                                   f"got {r!r}")
        differ = {m: k for m, k in ranks.items() if k != r}
        if differ:
            found = ", ".join(f"{m} {k}" for m, k in differ.items())
            raise AdapterLoadError(f"adapter {name!r}: {CONFIG_FILE} says r = {r} but the tensors "
                                   f"have rank {found}")

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
