"""Which part of the base model and of every adapter one tensor-parallel rank holds.

Megatron's split: q/k/v and gate/up are column-parallel (each rank computes a slice of the output
features: whole attention heads, a slice of the MLP's intermediate features); o and down are
row-parallel (each rank reads its slice of the input features and produces a partial sum of the
whole output, summed by an all-reduce). Embeddings, norms and lm_head stay replicated.

KV heads: with at least as many KV heads as ranks each rank holds ``num_kv_heads / N`` of them;
with fewer (GQA), each KV head is replicated over ``N / num_kv_heads`` ranks, and rank k holds KV
head ``k * num_kv_heads // N`` - the one its query heads attend with.

LoRA, the S-LoRA way: for a column-parallel module, A is split along the rank - rank k holds
rows ``k, k + N, k + 2N, ...`` of A (zero rows past the adapter's rank when N does not divide
it), so that the all-gathered shrink outputs, interleaved, are the whole ``x A^T`` in row order -
and B is split by output features like the base weight. For a row-parallel module, A is split
along its input features (the partial shrink outputs are all-reduced) and B by output features:
rank k adds its slice of ``z B^T`` into its slice of the base layer's partial sum, before the
base all-reduce.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from ..model_spec import ModelSpec

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
_LAYER_WEIGHT = re.compile(r"^model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+)\.(weight|bias)$")


def check_tensor_parallel(spec: ModelSpec, world: int) -> None:
    """Raise ValueError unless ``spec`` splits evenly over ``world`` ranks."""
    if world < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {world}")
    if spec.num_heads % world:
        raise ValueError(f"tensor_parallel_size {world} must divide the model's "
                         f"{spec.num_heads} attention heads")
    kv = spec.num_kv_heads
    if kv % world and world % kv:
        raise ValueError(f"tensor_parallel_size {world} and the model's {kv} KV heads: one must "
                         "divide the other (KV heads are split, or replicated over ranks)")
    for name, value in (("intermediate_size", spec.intermediate_size),
                        ("hidden_size", spec.hidden_size)):
        if value % world:
            raise ValueError(f"tensor_parallel_size {world} must divide the model's {name} {value}")


@dataclass(frozen=True)
class TensorParallelShard:
    """Rank ``rank`` of ``world``: slices of the full model ``spec`` it holds."""

    spec: ModelSpec
    rank: int
    world: int

    def __post_init__(self) -> None:
        check_tensor_parallel(self.spec, self.world)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, {self.world}), got {self.rank}")

    @property
    def local_kv_heads(self) -> int:
        return max(self.spec.num_kv_heads // self.world, 1)

    @property
    def local_spec(self) -> ModelSpec:
        """The shape this rank's layers have (hidden size, vocabulary, layers unchanged)."""
        s = self.spec
        return dataclasses.replace(s, num_heads=s.num_heads // self.world,
                                   num_kv_heads=self.local_kv_heads,
                                   intermediate_size=s.intermediate_size // self.world)

    def _part(self, total: int) -> slice:
        size = total // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def output_slice(self, module: str) -> slice:
        """Rows of a column-parallel module's weight (its output features) this rank computes."""
        s = self.spec
        if module == "q_proj":
            return self._part(s.q_dim)
        if module in ("k_proj", "v_proj"):
            if s.num_kv_heads >= self.world:
                return self._part(s.kv_dim)
            head = self.rank * s.num_kv_heads // self.world
            return slice(head * s.head_dim, (head + 1) * s.head_dim)
        if module in ("gate_proj", "up_proj"):
            return self._part(s.intermediate_size)
        raise ValueError(f"{module} is not column-parallel")

    def input_slice(self, module: str) -> slice:
        """Columns of a row-parallel module's weight (its input features) this rank reads."""
        if module == "o_proj":
            return self._part(self.spec.q_dim)
        if module == "down_proj":
            return self._part(self.spec.intermediate_size)
        raise ValueError(f"{module} is not row-parallel")

    @property
    def hidden_slice(self) -> slice:
        """The output features of a row-parallel module whose LoRA term this rank adds."""
        return self._part(self.spec.hidden_size)

    def shard_weight(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of one Hugging Face base-model tensor (replicated ones unchanged)."""
        m = _LAYER_WEIGHT.match(hf_name)
        if m is None:
            return tensor
        module = m.group(1)
        if module in COLUMN_PARALLEL:
            return tensor[self.output_slice(module)]
        if module in ROW_PARALLEL:
            return tensor[:, self.input_slice(module)]
        return tensor

    def adapter_rows(self, module: str, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of A (``kind`` "a", ``tensor`` = A ``[r, in]``) or of B^T (``kind``
        "b", ``tensor`` = B ``[out, r]``) of one module, as the pool holds them."""
        if kind == "a":
            if module in ROW_PARALLEL:
                return tensor[:, self.input_slice(module)]
            rank = tensor.shape[0]
            local = -(-rank // self.world)
            padded = tensor.new_zeros(local * self.world, tensor.shape[1])
            padded[:rank] = tensor
            return padded[self.rank::self.world]
        rows = self.hidden_slice if module in ROW_PARALLEL else self.output_slice(module)
        return tensor[rows].T
