"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) over the unified page pool.

Written once for every batch shape: the per-step ``ForwardContext`` says which tokens belong to
which sequence and adapter, and the ops (torch or Triton) do the paged attention and the
heterogeneous-batch LoRA. q/k/v and gate/up are fused projections; LoRA targets the slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import MODULE_INDEX, AttentionBatch, LoraBatch
from ..model_spec import ModelSpec
from ..ops import Ops


@dataclass
class ForwardContext:
    """Everything one forward step reads besides the token ids."""

    ops: Ops
    attn: AttentionBatch
    lora: LoraBatch | None
    pool: torch.Tensor  # [num_layers, num_pages, page_size]
    kv_shape: tuple[int, int, int, int]  # (2, block_tokens, num_kv_heads, head_dim)

    def kv_pages(self, layer: int) -> torch.Tensor:
        return self.pool[layer].view(self.pool.shape[1], *self.kv_shape)

    def lora_buffer(self, layer: int) -> torch.Tensor:
        return self.pool[layer].view(-1)


class LoraLinear(nn.Module):
    """``y = x W^T (+ b)`` plus, per token, ``scale_a * x A_a^T B_a^T`` on each target slice.

    One fused projection may cover several LoRA modules (q/k/v, gate/up): ``modules`` names them
    and ``out_dims`` gives the width of each slice of the output, in order.
    """

    def __init__(
        self, in_dim: int, out_dims: list[int], modules: list[str], bias: bool,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        super().__init__()
        out = sum(out_dims)
        self.weight = nn.Parameter(torch.empty(out, in_dim, dtype=dtype, device=device), False)
        self.bias = (
            nn.Parameter(torch.empty(out, dtype=dtype, device=device), False) if bias else None
        )
        self.modules_idx = tuple(MODULE_INDEX[m] for m in modules)
        self.out_dims = tuple(out_dims)
        self.out_starts = tuple(sum(out_dims[:i]) for i in range(len(out_dims)))

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer: int) -> torch.Tensor:
        if ctx.lora is not None and ctx.lora.has_lora and ctx.lora.targets_any(self.modules_idx):
            return ctx.ops.linear_with_lora(x, self.weight, self.bias, ctx.lora_buffer(layer),
                                            ctx.lora, self.modules_idx, self.out_starts,
                                            self.out_dims)
        return F.linear(x, self.weight, self.bias)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, index: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        h, q, kv, i = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size
        self.index = index
        self.spec = spec
        self.input_norm = nn.Parameter(torch.empty(h, dtype=dtype, device=device), False)
        self.post_norm = nn.Parameter(torch.empty(h, dtype=dtype, device=device), False)
        self.qkv = LoraLinear(h, [q, kv, kv], ["q_proj", "k_proj", "v_proj"],
                              spec.attention_bias, dtype, device)
        self.o = LoraLinear(q, [h], ["o_proj"], False, dtype, device)
        self.gate_up = LoraLinear(h, [i, i], ["gate_proj", "up_proj"], False, dtype, device)
        self.down = LoraLinear(i, [h], ["down_proj"], False, dtype, device)
        self.scale = spec.head_dim ** -0.5

    def forward(
        self, x: torch.Tensor, pending: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        """One layer. ``x`` is the residual stream [T, hidden], updated in place; ``pending`` the
        previous layer's MLP output, not yet added to it (None before the first layer). Returns
        this layer's MLP output, pending for the next layer (or ``finish``)."""
        q = self.pre_attention(x, pending, cos, sin, ctx)
        attn = ctx.ops.attention(q, ctx.kv_pages(self.index), ctx.attn, self.scale)
        return self.post_attention(attn, x, ctx)

    def pre_attention(
        self, x: torch.Tensor, pending: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        """Residual add of ``pending`` into ``x`` (in place), norm, q/k/v projection, RoPE and
        the KV write of this step's tokens; returns the queries [T, heads, head_dim]. The add is
        fused with the norm: one kernel where an add and a norm would be two, each reading x."""
        s, ops, n = self.spec, ctx.ops, x.shape[0]
        h = (ops.rms_norm(x, self.input_norm, s.rms_norm_eps) if pending is None
             else ops.add_rms_norm(pending, x, self.input_norm, s.rms_norm_eps))
        qkv = self.qkv(h, ctx, self.index)
        q, k, v = qkv.split([s.q_dim, s.kv_dim, s.kv_dim], dim=-1)
        q = q.reshape(n, s.num_heads, s.head_dim)
        k = k.reshape(n, s.num_kv_heads, s.head_dim)
        v = v.reshape(n, s.num_kv_heads, s.head_dim)
        q, k = ops.rotary(q, k, cos, sin)
        ops.write_kv(ctx.kv_pages(self.index), k, v, ctx.attn)
        return q

    def post_attention(self, attn: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Output projection, norm and MLP over the attention output ``attn`` [T, heads,
        head_dim] (or [T, q_dim]). The attention's residual add goes into ``x`` in place; the
        MLP output is returned, for the next layer's ``pre_attention`` to add."""
        s, ops = self.spec, ctx.ops
        attn = attn.reshape(x.shape[0], s.q_dim)
        h = ops.add_rms_norm(self.o(attn, ctx, self.index), x, self.post_norm, s.rms_norm_eps)
        return self.down(ops.silu_and_mul(self.gate_up(h, ctx, self.index)), ctx, self.index)

    @staticmethod
    def finish(x: torch.Tensor, pending: torch.Tensor) -> torch.Tensor:
        """The last layer's MLP output added into the residual stream ``x``; returns x."""
        return x.add_(pending)


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.spec = spec
        self.embed = nn.Parameter(
            torch.empty(spec.vocab_size, spec.hidden_size, dtype=dtype, device=device), False
        )
        self.layers = nn.ModuleList(DecoderLayer(spec, i, dtype, device) for i in range(spec.num_layers))
        self.norm = nn.Parameter(torch.empty(spec.hidden_size, dtype=dtype, device=device), False)
        self.lm_head = (
            self.embed if spec.tie_word_embeddings
            else nn.Parameter(torch.empty_like(self.embed), False)
        )
        # transformers computes the inverse frequencies for every RoPE scaling type (llama3, ...).
        self.rotary = LlamaRotaryEmbedding(spec.hf_config).to(device)

    def forward(
        self, input_ids: torch.Tensor, ctx: ForwardContext, sample_rows: torch.Tensor
    ) -> torch.Tensor:
        """Run the flat batch; return fp32 logits ``[len(sample_rows), vocab]``."""
        x, cos, sin = self.embed_tokens(input_ids, ctx)
        pending = None
        for layer in self.layers:
            pending = layer(x, pending, cos, sin, ctx)
        return self.compute_logits(DecoderLayer.finish(x, pending), sample_rows, ctx)

    def embed_tokens(
        self, input_ids: torch.Tensor, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, cos, sin): the residual stream [T, hidden] (a fresh tensor: the layers add into it
        in place) and the RoPE tables [T, head_dim] of ``ctx.attn.positions``, in x's dtype."""
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.rotary(x, ctx.attn.positions[None])
        return x, cos[0].to(x.dtype), sin[0].to(x.dtype)

    def compute_logits(
        self, x: torch.Tensor, sample_rows: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """fp32 logits ``[len(sample_rows), vocab]`` of the rows ``sample_rows`` of the final
        residual stream ``x``."""
        x = ctx.ops.rms_norm(x[sample_rows], self.norm, self.spec.rms_norm_eps)
        return F.linear(x, self.lm_head).float()

    def load_weight(self, hf_name: str, tensor: torch.Tensor) -> bool:
        """Copy one Hugging Face tensor into its (possibly fused) place. False if not ours."""
        target = self._target(hf_name)
        if target is None:
            return False
        param, rows = target
        dst = param.data if rows is None else param.data[rows[0]:rows[1]]
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(f"{hf_name}: shape {list(tensor.shape)}, expected {list(dst.shape)}")
        dst.copy_(tensor.to(dst.dtype))
        return True

    def _target(self, name: str) -> tuple[nn.Parameter, tuple[int, int] | None] | None:
        s = self.spec
        if name == "model.embed_tokens.weight":
            return self.embed, None
        if name == "model.norm.weight":
            return self.norm, None
        if name == "lm_head.weight":
            return (None if s.tie_word_embeddings else (self.lm_head, None))  # type: ignore[return-value]
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"]:
            return None
        layer = self.layers[int(parts[2])]
        sub = ".".join(parts[3:])
        q, kv, i = s.q_dim, s.kv_dim, s.intermediate_size
        fused = {
            "self_attn.q_proj": (layer.qkv, (0, q)),
            "self_attn.k_proj": (layer.qkv, (q, q + kv)),
            "self_attn.v_proj": (layer.qkv, (q + kv, q + 2 * kv)),
            "self_attn.o_proj": (layer.o, None),
            "mlp.gate_proj": (layer.gate_up, (0, i)),
            "mlp.up_proj": (layer.gate_up, (i, 2 * i)),
            "mlp.down_proj": (layer.down, None),
        }
        if sub == "input_layernorm.weight":
            return layer.input_norm, None
        if sub == "post_attention_layernorm.weight":
            return layer.post_norm, None
        module, _, kind = sub.rpartition(".")
        if module in fused:
            linear, rows = fused[module]
            param = linear.weight if kind == "weight" else linear.bias
            if param is None:
                return None
            return param, rows
        return None

    def expected_weights(self) -> int:
        """How many Hugging Face tensors a complete checkpoint supplies."""
        per_layer = 9 + (3 if self.spec.attention_bias else 0)
        return 2 + per_layer * self.spec.num_layers + (0 if self.spec.tie_word_embeddings else 1)
