"""Each rank reads its own shard of an adapter from the safetensors file, into its host cache."""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapters.host_store import AdapterStore
from ..adapters.names import WEIGHTS_FILE
from ..adapters.reader import LORA_KEY, plan_runs
from ..adapters.validation import AdapterEntry
from ..errors import AdapterLoadError
from ..layout import AdapterPlan
from .layout import ShardedPoolLayout
from .shards import TensorParallelShard


def read_adapter_shard(path: Path, plan: AdapterPlan, shard: TensorParallelShard,
                       dtype: torch.dtype) -> torch.Tensor:
    """``[layers, plan.used_elements]``: this rank's rows of every target module, in the plan's
    row order (as ``AdapterFileReader.read`` packs a whole adapter)."""
    from safetensors import safe_open

    num_layers = shard.spec.num_layers
    with safe_open(path, framework="pt") as f:
        keys = {}
        for key in f.keys():
            m = LORA_KEY.match(key)
            if m is not None:
                keys[(int(m.group(1)), m.group(2), m.group(3).lower())] = key
        packed = []
        for layer in range(num_layers):
            rows: dict[tuple[str, str], torch.Tensor] = {}
            pieces = []
            for (module, kind), first, count in plan_runs(plan.rows):
                if (module, kind) not in rows:
                    tensor = f.get_tensor(keys[(layer, module, kind)]).float()
                    rows[(module, kind)] = shard.adapter_rows(module, kind, tensor)
                pieces.append(rows[(module, kind)][first:first + count].reshape(-1))
            packed.append(torch.cat(pieces))
    return torch.stack(packed).to(dtype)


class ShardedAdapterStore(AdapterStore):
    """``AdapterStore`` of one rank: same registry and host LRU, weights read as its shard."""

    layout: ShardedPoolLayout

    def _read_weights(self, entry: AdapterEntry) -> torch.Tensor:
        try:
            packed = read_adapter_shard(entry.path / WEIGHTS_FILE, entry.plan, self.layout.shard,
                                        self.dtype)
        except Exception as e:  # a file damaged after registration: any parsing error
            raise AdapterLoadError(f"adapter {entry.name!r}: cannot read weights: {e}") from None
        if self.pin_memory and torch.cuda.is_available():
            packed = packed.pin_memory()
        return packed
