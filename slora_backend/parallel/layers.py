"""The LoRA-aware linear layers of a tensor-parallel rank, and the sharded model built of them.

The collectives sit between the existing ops (shrink, expand), which run unchanged on the
sharded shapes (torch references on CPU, Triton kernels on CUDA):

- column-parallel (q/k/v, gate/up): ``z_k = x A_k^T`` over this rank's ``ceil(r / N)`` rows of A,
  all-gathered to ``z = x A^T`` (``[tokens, r]``, interleaved back to A's row order), then
  ``y_k += s * z B_k^T`` for this rank's output features. No base collective.
- row-parallel (o, down): ``z = sum_k x_k A_k^T`` (all-reduce of ``[tokens, r]``), then
  ``y_k[:, hidden slice k] += s * z B_k^T`` into this rank's partial sum, and the base model's
  own all-reduce of ``[tokens, hidden]`` sums both.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from ..batch import LoraBatch
from ..model_loader import _load_safetensors, random_config, resolve_model_dir
from ..model_spec import ModelSpec
from ..models.llama import ForwardContext, LlamaModel, LoraLinear
from .comm import Communicator
from .shards import TensorParallelShard


def rank_split_view(lora: LoraBatch, world: int) -> LoraBatch:
    """``lora`` as a column-parallel shrink sees it: ``ceil(r / world)`` rows of A per module
    (the offsets of those rows are the first entries of ``a_offsets``). Built once per step."""
    view = lora.scratch.get("tensor_parallel_rank_split")
    if view is None:
        local_max = -(-lora.max_rank // world)
        # (b_offsets cut alike: the kernels' tables must agree in width; a shrink reads no B)
        view = dataclasses.replace(
            lora, ranks=torch.div(lora.ranks + (world - 1), world, rounding_mode="floor"),
            a_offsets=lora.a_offsets[:, :, :local_max], b_offsets=lora.b_offsets[:, :, :local_max],
            max_rank=local_max, scratch={})
        lora.scratch["tensor_parallel_rank_split"] = view
    return view


class ColumnParallelLoraLinear(LoraLinear):
    """A column-parallel projection: this rank's output features (``out_dims`` per module)."""

    comm: Communicator

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer: int) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        lora = ctx.lora
        if lora is not None and lora.has_lora and lora.targets_any(self.modules_idx):
            buf = ctx.lora_buffer(layer)
            z = ctx.ops.lora_shrink(x, buf, rank_split_view(lora, self.comm.world), self.modules_idx)
            z = self.comm.gather_interleaved(z)
            if z.shape[-1] != lora.max_rank:  # (columns past every rank are zero)
                z = z[..., :lora.max_rank].contiguous()
            ctx.ops.lora_expand(y, z, buf, lora, self.modules_idx, self.out_starts, self.out_dims)
        return y


class RowParallelLoraLinear(LoraLinear):
    """A row-parallel projection: reads this rank's input features, returns the whole output
    (all-reduced); the LoRA term of output slice ``lora_out`` is added by this rank."""

    comm: Communicator
    lora_out: slice

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer: int) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (no row-parallel projection has a bias)
        lora = ctx.lora
        if lora is not None and lora.has_lora and lora.targets_any(self.modules_idx):
            buf = ctx.lora_buffer(layer)
            z = ctx.ops.lora_shrink(x, buf, lora, self.modules_idx)
            self.comm.all_reduce(z, lora=True)
            width = self.lora_out.stop - self.lora_out.start
            ctx.ops.lora_expand(y, z, buf, lora, self.modules_idx, (self.lora_out.start,), (width,))
        self.comm.all_reduce(y)
        return y


def _become(linear: LoraLinear, cls: type, comm: Communicator, **attrs) -> None:
    linear.__class__ = cls  # same parameters and slices; only forward differs
    linear.comm = comm
    for name, value in attrs.items():
        setattr(linear, name, value)


def parallelize(model: LlamaModel, shard: TensorParallelShard, comm: Communicator) -> None:
    """Turn the projections of ``model`` (built with ``shard.local_spec``) into their
    tensor-parallel forms."""
    for layer in model.layers:
        _become(layer.qkv, ColumnParallelLoraLinear, comm)
        _become(layer.gate_up, ColumnParallelLoraLinear, comm)
        _become(layer.o, RowParallelLoraLinear, comm, lora_out=shard.hidden_slice)
        _become(layer.down, RowParallelLoraLinear, comm, lora_out=shard.hidden_slice)


class _ShardingLoader:
    """What ``_load_safetensors`` calls, cutting each tensor to this rank's part first."""

    def __init__(self, model: LlamaModel, shard: TensorParallelShard) -> None:
        self.model = model
        self.shard = shard

    def load_weight(self, hf_name: str, tensor: torch.Tensor) -> bool:
        return self.model.load_weight(hf_name, self.shard.shard_weight(hf_name, tensor))

    def expected_weights(self) -> int:
        return self.model.expected_weights()


def _fill_random_shard(model: LlamaModel, seed: int, rank: int) -> None:
    shared = torch.Generator(device=model.embed.device).manual_seed(seed)
    own = torch.Generator(device=model.embed.device).manual_seed(seed + 7919 * (rank + 1))
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.data.fill_(1.0 if "norm" in name else 0.0)
        else:
            p.data.normal_(0.0, 0.02, generator=own if name.startswith("layers.") else shared)


def full_spec(base_model: str, min_vocab: int = 0) -> ModelSpec:
    """The whole model's shape, read without building it."""
    from transformers import AutoConfig

    if base_model.startswith("random:"):
        config = random_config(base_model.split(":", 1)[1])
        config.vocab_size = max(config.vocab_size, min_vocab)
        return ModelSpec.from_hf_config(config)
    return ModelSpec.from_hf_config(AutoConfig.from_pretrained(resolve_model_dir(base_model)))


def load_model_shard(base_model: str, shard: TensorParallelShard, comm: Communicator,
                     dtype: torch.dtype, device: torch.device,
                     seed: int) -> tuple[LlamaModel, Path | None]:
    """This rank's part of the base model, tensor-parallel. Random weights: the replicated ones
    (embeddings, norms, lm_head) are the same on every rank, the sharded ones drawn per rank
    (so they differ from a single-GPU model of the same seed: they serve throughput work)."""
    model = LlamaModel(shard.local_spec, dtype, device)
    parallelize(model, shard, comm)
    if base_model.startswith("random:"):
        _fill_random_shard(model, seed, shard.rank)
        return model, None
    model_dir = resolve_model_dir(base_model)
    _load_safetensors(_ShardingLoader(model, shard), model_dir)
    return model, model_dir
