"""Engine and sampling configuration: frozen dataclasses validated once, at construction."""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field

import torch

from .errors import InvalidRequestError

logger = logging.getLogger(__name__)

# The lowest temperature sampled as asked: vLLM's floor (``_MAX_TEMP = 1e-2`` in its
# sampling_params.py). Below it, fp32 logits divided by the temperature overflow to inf and the
# softmax gives NaN; vLLM raises such temperatures to the floor with a warning, and so do we.
MIN_TEMPERATURE = 1e-2

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start. Raises ValueError naming the field on bad values.

    ``base_model``: a Hugging Face directory (config.json + *.safetensors), a ``.gguf`` file, or
    ``random:<shape>`` (see ``model_loader.RANDOM_SHAPES``) for throughput work.
    ``pool_pages``: pages in the unified pool; None sizes it (``memory.py``) on CUDA from this
    engine's share of the device, ``gpu_memory_utilization`` x its total memory (vLLM's rule:
    weights, a profiled peak step, CUDA graphs and per-page tables come out of the share, the
    pool gets the rest; that share must be free at start-up), on CPU from ``cpu_pool_bytes``.
    """

    base_model: str
    adapter_root: str | None = None
    # A Hugging Face hub cache directory: set, a lora_name like "org/name" resolves from it
    # (adapters/hf_cache.py: confined to it, safetensors only, nothing downloaded). None: off.
    hf_hub_cache: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    kernel_backend: str | None = None  # None: "triton" on CUDA, "torch" on CPU
    tokenizer: str | None = None  # defaults to the base model directory
    pool_pages: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_pool_bytes: int = 512 * 2**20
    block_tokens: int = 16
    max_num_seqs: int = 256
    max_batched_tokens: int = 4096
    max_model_len: int | None = None
    max_adapters_per_batch: int | None = None  # None: no limit beyond the pool
    host_adapter_bytes: int = 64 * 2**30  # adapter weights kept in host memory before LRU drop
    # Read every registered adapter into host memory in the background after start-up (and each
    # one registered later), while host_adapter_bytes has room: a request's first use then needs
    # no disk read. Off: adapters are read when a request first asks for them.
    preload_adapters: bool = False
    # Off by default: each pinned allocation (cudaHostAlloc) takes the driver's lock and orders the
    # whole device, so pinning every adapter as it is read stalled a serving engine that reads
    # dozens a second (S1, n=2000, on the H200). Pageable copies block only the engine thread.
    pin_host_memory: bool = False
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (used on CUDA with the Triton kernels)
    # Also replay steps that prefill from piecewise CUDA graphs (attention eager between pieces,
    # piecewise_graphs.py); only where cuda_graphs is used. On the H200 (7B, batch 64) they win
    # where host time dominates a step (1.16-3.4x up to 384 tokens) and lose to their padding
    # where the GPU does (0.90x at 576 and 1088 tokens): steps of more than
    # piecewise_max_tokens tokens run eagerly (None: max_batched_tokens). A step that stays
    # within it also admits queued requests at once (``Scheduler.cheap_step_tokens``). Pieces
    # of 1024 tokens pad more than eager costs, but admitting at once is what the first token
    # needs: with newest_first_after_s below, on the H200 at R = 60 it came before vLLM 0.26's
    # at every n of the S1/S2 traces (docs/benchmarks.md, "Beside vLLM 0.26"); with 64-token
    # buckets (below) it served about as many requests as 384 tokens and first come, first
    # served (S1 n = 2000: 22.5 req/s against 22.3-22.7 in other runs that day; "Token buckets").
    piecewise_graphs: bool = True
    piecewise_max_tokens: int | None = 1024
    # Piecewise steps are padded to token buckets this far apart up to 1024 tokens (coarser
    # above): finer buckets pad less and take more graphs to capture at start-up
    # (piecewise_graphs.bucket_grid; 64: 18 buckets up to 1024 per adapter kind).
    piecewise_bucket_tokens: int = 64
    prefetch_adapters: bool = True  # copy queued requests' adapters into free pages ahead of use
    # While all running requests decode, admit queued ones only every admit_wait_steps + 1 steps
    # (see Scheduler). None: 8 where decode steps replay CUDA graphs, 0 (every step) elsewhere.
    admit_wait_steps: int | None = None
    # ... and wait only while more requests queue than the batch has free places.
    admit_wait_only_when_full: bool = False
    # Split the segment shrink's K when its grid is small (a short prompt beside decode rows;
    # slora_kernels/split_k.py). On the H200 a 384-token step of 256 decode rows + a 128-token
    # prompt took 26.8 ms with it, 27.5 without (docs/benchmarks.md); CPU launches never split.
    split_k_shrink: bool = True
    # Run each LoRA shrink on a side stream beside its base matmul (CUDA, Triton kernels; the
    # tensor-parallel layers keep theirs in line). Off: on the H200 it took under 1% off a
    # decode step at batch 64 and 256 (docs/benchmarks.md).
    overlap_lora_shrink: bool = False
    # Compile every Triton kernel variant serving can meet before the first request (CUDA only):
    # a compile in the middle of serving stalls every running request for seconds.
    warm_up: bool = True
    # Ablations of the S-LoRA paper: LoRA as padded gather + bmm ("bmm"), and adapters in a
    # fixed partition of this many pages instead of sharing the pool with KV ("no unified memory").
    lora_ops: str | None = None
    adapter_pool_pages: int | None = None
    # Overload: drop queued requests that can no longer meet the first-token SLO (S-LoRA's early
    # abort), and refuse new requests beyond a queue length.
    slo_ttft_s: float | None = None
    early_abort: bool = False
    max_waiting: int | None = None
    # ... and once the oldest queued request has waited this long (the queue no longer drains),
    # admit the newest first (adaptive LIFO; preempted requests still go first). Past capacity
    # this keeps most first tokens early and leaves the wait to those already late; early_abort
    # drops those at the SLO. None: first come, first served always.
    newest_first_after_s: float | None = 0.5
    # Devices one engine spans (tensor parallelism, ``slora_backend/parallel``): the engine
    # process is rank 0 and starts a worker process per further rank; CUDA ranks take the devices
    # following ``device``. Must divide the attention heads, hidden and intermediate sizes.
    tensor_parallel_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.base_model:
            raise ValueError("base_model must name a directory, a .gguf file or random:<shape>")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:n]', got {self.device!r}")
        if self.kernel_backend not in (None, "torch", "triton"):
            raise ValueError(
                f"kernel_backend must be 'torch', 'triton' or None, got {self.kernel_backend!r}"
            )
        for name in ("block_tokens", "max_num_seqs", "max_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pool_pages is not None and self.pool_pages < 1:
            raise ValueError(f"pool_pages must be >= 1, got {self.pool_pages}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.lora_ops not in (None, "bmm"):
            raise ValueError(f"lora_ops must be None or 'bmm', got {self.lora_ops!r}")
        if self.piecewise_max_tokens is not None and self.piecewise_max_tokens < 1:
            raise ValueError(f"piecewise_max_tokens must be >= 1, got {self.piecewise_max_tokens}")
        if not (16 <= self.piecewise_bucket_tokens <= 1024 and self.piecewise_bucket_tokens % 16 == 0):
            raise ValueError("piecewise_bucket_tokens must be a multiple of 16 from 16 to 1024, "
                             f"got {self.piecewise_bucket_tokens}")
        if self.admit_wait_steps is not None and self.admit_wait_steps < 0:
            raise ValueError(f"admit_wait_steps must be >= 0, got {self.admit_wait_steps}")
        for name in ("adapter_pool_pages", "max_waiting"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.slo_ttft_s is not None and not self.slo_ttft_s > 0:
            raise ValueError(f"slo_ttft_s must be > 0, got {self.slo_ttft_s}")
        if self.early_abort and self.slo_ttft_s is None:
            raise ValueError("early_abort needs slo_ttft_s")
        if self.newest_first_after_s is not None and not self.newest_first_after_s >= 0:
            raise ValueError(f"newest_first_after_s must be >= 0, got {self.newest_first_after_s}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def piecewise_token_limit(self) -> int:
        """The largest step (tokens) that replays piecewise graphs."""
        return min(self.piecewise_max_tokens or self.max_batched_tokens, self.max_batched_tokens)

    @property
    def resolved_kernel_backend(self) -> str:
        if self.kernel_backend is not None:
            return self.kernel_backend
        return "triton" if self.device.startswith("cuda") else "torch"


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. temperature 0 is greedy; top_k 0 disables top-k.

    A temperature in (0, ``MIN_TEMPERATURE``) = (0, 0.01) is raised to 0.01 with a warning, as
    vLLM does: lower ones overflow the logits. Raises ``InvalidRequestError`` (a ValueError)
    naming the parameter and its allowed range.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or math.isnan(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if math.isinf(self.temperature):
            raise InvalidRequestError("temperature must be finite, got inf")
        if 0 < self.temperature < MIN_TEMPERATURE:
            logger.warning("temperature %s is below %s, where the logits overflow; sampling at %s",
                           self.temperature, MIN_TEMPERATURE, MIN_TEMPERATURE)
            object.__setattr__(self, "temperature", MIN_TEMPERATURE)
        if not _is_real(self.top_p) or math.isnan(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k):
            raise InvalidRequestError(f"top_k must be an integer, got {self.top_k!r}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise InvalidRequestError(f"seed must be an integer in [0, 2^64), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        for name, kind in (("max_tokens", int), ("temperature", float), ("top_p", float), ("top_k", int)):
            object.__setattr__(self, name, kind(getattr(self, name)))  # (numpy scalars from a client)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
