"""``Ops``: the compute the model delegates, as one interface with capability flags.

The model (``models/llama.py``) does its matmuls itself and calls an ``Ops`` object for
everything that reads the page pool or has a kernel: LoRA shrink / expand, KV writes, paged
attention, the norms, SiLU-and-mul and RoPE. A projection with LoRA goes through
``linear_with_lora`` (matmul, shrink, expand), so an implementation may overlap its parts.
Implementations: ``TorchOps`` (the references of ``slora_kernels``, the CPU path),
``TritonOps`` (the Triton kernels) and ``BmmLora`` (the "bmm" LoRA ablation around either).
Callers decide by the capability flags below, never by an implementation's name.

Shapes: T tokens of a step laid end to end; ``pool`` is one layer's flat pool buffer (1-D, the
activations' dtype); ``modules`` are 1-3 indices into ``batch.LORA_MODULES`` that share one
input (q/k/v, gate/up); R = ``lora.max_rank``-wide tables (``LoraBatch``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..batch import AttentionBatch, LoraBatch


class Ops(ABC):
    """The ops of one forward step. Every method's first docstring line is its semantics."""

    #: A short label for logs and benchmark reports (never used to decide behaviour).
    name: str
    #: The LoRA ops read ``LoraBatch`` tables indexed by the adapter's global pool slot (the
    #: row of its first pool page in the runner's device ``SlotTables``), which also hold rows
    #: no token of the step uses. False: the tables hold the step's adapters as dense slots
    #: 0 .. S-1, gathered on the host each step (``LoraTables``).
    global_slots: bool
    #: Every op launches with grids sized from host integers only (no device-to-host sync, no
    #: data-dependent host control flow), so a decode step can be captured in a CUDA graph.
    graph_capturable: bool

    @abstractmethod
    def lora_shrink(
        self, x: torch.Tensor, pool: torch.Tensor, lora: LoraBatch, modules: Sequence[int]
    ) -> torch.Tensor:
        """z[i, mi, j] = sum_k x[i, k] * A_{s_i, modules[mi]}[j, k] for j < rank(s_i, m), else 0.

        x: [T, in_dim]; returns z: [T, len(modules), R] in x's dtype (fp32 accumulation); rows
        of base-model tokens (slot -1) are zero. z may be a buffer the ops reuse: it is valid
        until the next ``lora_shrink`` of the same modules in this step.
        """

    @abstractmethod
    def lora_expand(
        self,
        y: torch.Tensor,
        z: torch.Tensor,
        pool: torch.Tensor,
        lora: LoraBatch,
        modules: Sequence[int],
        out_starts: Sequence[int],
        out_dims: Sequence[int],
    ) -> None:
        """y[i, out_starts[mi] + n] += scalings[s_i] * sum_{j<rank} z[i, mi, j] * B^T_{s_i, m}[j, n].

        y: [T, total_out] updated in place for n < out_dims[mi]; z: [T, len(modules), R] from
        ``lora_shrink``. Rows of base-model tokens and modules of rank 0 leave y untouched.
        """

    def linear_with_lora(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        pool: torch.Tensor,
        lora: LoraBatch,
        modules: Sequence[int],
        out_starts: Sequence[int],
        out_dims: Sequence[int],
    ) -> torch.Tensor:
        """y = x W^T (+ b), then y += the LoRA of ``modules`` (``lora_shrink``, ``lora_expand``).

        An implementation may run the shrink beside the matmul (both only read x).
        """
        y = F.linear(x, weight, bias)
        z = self.lora_shrink(x, pool, lora, modules)
        self.lora_expand(y, z, pool, lora, modules, out_starts, out_dims)
        return y

    @abstractmethod
    def write_kv(
        self, kv_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionBatch
    ) -> None:
        """kv_pages[s_i // bt, 0, s_i % bt] = k[i]; kv_pages[s_i // bt, 1, s_i % bt] = v[i].

        s_i = ``attn.kv_slots[i]``; tokens with s_i < 0 write nothing. kv_pages:
        [pages, 2, block_tokens, kv_heads, head_dim]; k, v: [T, kv_heads, head_dim].
        """

    @abstractmethod
    def attention(
        self, q: torch.Tensor, kv_pages: torch.Tensor, attn: AttentionBatch, scale: float
    ) -> torch.Tensor:
        """out[i] = softmax_j(scale * q[i] . K_b[j], j <= pos_i) @ V_b (causal, paged, GQA).

        q: [T, heads, head_dim]; b is token i's sequence, K_b / V_b its cached keys and values
        (``attn.block_tables``). Returns [T, heads, head_dim] in q's dtype.
        """

    @abstractmethod
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32; x: [T, H]."""

    @abstractmethod
    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """residual <- x + residual (in place); returns rms_norm(residual)."""

    @abstractmethod
    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """out = silu(gate) * up, where gate_up = [gate | up]: [T, 2I] -> [T, I]."""

    @abstractmethod
    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x' = x * cos + rotate_half(x) * sin for x in (q, k) (HF layout: halves rotated).

        q: [T, heads, d], k: [T, kv_heads, d], cos / sin: [T, d] in q's dtype.
        """
