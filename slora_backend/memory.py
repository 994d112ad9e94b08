"""How many pages the unified pool gets: this engine's share of the GPU, vLLM's rule.

The share is ``gpu_memory_utilization x`` the device's TOTAL memory, whatever other engines or
processes in or outside this one hold: they must leave that much free at start-up, or the
engine refuses to start. From the share go the model's weights, the peak of a profiled dummy
step (``max_batched_tokens`` tokens over ``max_num_seqs`` sequences: activations, logits, batch
metadata), the decode CUDA graphs (``graph_bytes``: an upper estimate, as graphs are captured
after the pool exists) and the piecewise ones if enabled (``piecewise_graph_bytes``), and what
loading allocated outside torch's allocator (cuBLAS workspaces, kernel modules). The rest holds
pages; a page costs its bytes in every layer plus its row of every per-page table
(``slot_table_bytes_per_page``).

``plan_pool`` and the estimates are plain arithmetic (unit tested on CPU); ``profile_peak_step``
is the CUDA measurement that feeds them.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .config import EngineConfig, SamplingParams
from .cuda_graphs import BATCH_BUCKETS, RANK_BUCKETS
from .layout import PoolLayout
from .model_runner import ModelRunner
from .model_spec import ModelSpec
from .page_pool import PagePool
from .piecewise_graphs import DEFAULT_BUCKET_SPACING, token_buckets
from .request import Request, RequestStatus
from .scheduler import ScheduledRequest

logger = logging.getLogger(__name__)

GIB = 2**30
NUM_LORA_MODULES = 7  # q k v o gate up down: the tables' second dimension (batch.LORA_MODULES)
# SlotTables are budgeted for adapters up to this rank (the largest CUDA-graph rank bucket);
# a larger rank widens them past the budget.
MAX_BUDGETED_RANK = RANK_BUCKETS[-1]


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclass(frozen=True)
class MemoryPlan:
    """What the share was spent on (bytes), and the pages that fit in the rest."""

    total_bytes: int
    share_bytes: int
    weights_bytes: int
    peak_step_bytes: int
    graph_bytes: int
    other_bytes: int
    page_bytes: int
    table_bytes_per_page: int
    pages: int

    def describe(self) -> str:
        return (f"{self.pages} pages of {self.page_bytes + self.table_bytes_per_page} bytes in "
                f"{_gib(self.share_bytes)} of {_gib(self.total_bytes)} (weights "
                f"{_gib(self.weights_bytes)}, peak step {_gib(self.peak_step_bytes)}, CUDA graphs "
                f"{_gib(self.graph_bytes)}, other {_gib(self.other_bytes)})")


def check_share(total_bytes: int, used_by_others: int, fraction: float) -> int:
    """This engine's share in bytes; ValueError with the numbers when it is not free."""
    share = int(total_bytes * fraction)
    free = total_bytes - used_by_others
    if share > free:
        raise ValueError(
            f"gpu_memory_utilization {fraction} asks for {_gib(share)} of the device's "
            f"{_gib(total_bytes)}, but only {_gib(free)} are free ({_gib(used_by_others)} are held "
            f"by other engines or processes); lower gpu_memory_utilization or free the device")
    return share


def plan_pool(*, total_bytes: int, used_by_others: int, fraction: float, weights_bytes: int,
              peak_step_bytes: int, page_bytes: int, table_bytes_per_page: int,
              graph_bytes: int = 0, other_bytes: int = 0, min_pages: int = 1) -> MemoryPlan:
    """The pool for ``fraction`` of ``total_bytes``. Raises ValueError with the numbers when the
    share is not free (``used_by_others`` held at start-up) or leaves fewer than ``min_pages``
    pages (the pages of one request of the full context)."""
    share = check_share(total_bytes, used_by_others, fraction)
    left = share - weights_bytes - peak_step_bytes - graph_bytes - other_bytes
    per_page = page_bytes + table_bytes_per_page
    pages = max(left, 0) // per_page
    plan = MemoryPlan(total_bytes, share, weights_bytes, peak_step_bytes, graph_bytes,
                      other_bytes, page_bytes, table_bytes_per_page, pages)
    if pages < min_pages:
        raise ValueError(
            f"gpu_memory_utilization {fraction} leaves room for {plan.describe()}, but one "
            f"request of the full context needs {min_pages} pages; raise gpu_memory_utilization "
            f"or lower max_model_len, max_num_seqs or max_batched_tokens")
    return plan


def cpu_pool_pages(budget_bytes: int, page_bytes: int, min_pages: int = 1) -> int:
    """The pool for ``cpu_pool_bytes`` on the host (no per-page device tables there)."""
    pages = budget_bytes // page_bytes
    if pages < min_pages:
        raise ValueError(f"cpu_pool_bytes {budget_bytes} holds {pages} pages of {page_bytes} "
                         f"bytes; one request of the full context needs {min_pages}")
    return pages


def slot_table_bytes_per_page(max_rank: int = MAX_BUDGETED_RANK) -> int:
    """Device bytes per pool page of ``SlotTables`` (the Triton kernels' LoRA tables, a row per
    page) for adapters up to ``max_rank``: ranks int32 [7] and scaling fp32, A and B^T offsets
    int64 [7, width]; while the tables widen, the old ones live beside the new (half width)."""
    width = 8
    while width < max_rank:
        width *= 2
    offsets = 2 * NUM_LORA_MODULES * width * 8
    widening = offsets // 2 if width > 8 else 0
    return NUM_LORA_MODULES * 4 + 4 + offsets + widening


def graph_bytes(*, max_batch: int, vocab_size: int, max_model_len: int, block_tokens: int,
                peak_step_bytes: int) -> int:
    """An upper estimate of the decode graphs' memory: every (rank bucket, target set) kind
    captured at every batch bucket, each keeping its static inputs and fp32 logits, plus one
    step's intermediates in their shared memory pool."""
    buckets = sum(b for b in BATCH_BUCKETS if b <= max_batch)
    kinds = 1 + 2 * (len(RANK_BUCKETS) - 1)  # base model; per rank: attention-only or all modules
    block_table_row = -(-max_model_len // block_tokens) * 4
    per_row = vocab_size * 4 + block_table_row + 64  # + ids, positions, lengths, slots
    return kinds * buckets * per_row + peak_step_bytes


def piecewise_graph_bytes(*, spec: ModelSpec, max_batch: int, max_tokens: int, dtype_bytes: int,
                          max_batched_tokens: int, peak_step_bytes: int,
                          bucket_spacing: int = DEFAULT_BUCKET_SPACING) -> int:
    """An upper estimate of the piecewise graphs' memory: their shared buffers (inputs, residual
    stream, queries, attention output, RoPE tables of the largest token bucket), each key's
    LoRA z buffers (every rank bucket, with and without the MLP's modules, at every token
    bucket) and one piece's intermediates in their own pool (at most a profiled step's peak,
    scaled up to the largest bucket)."""
    buckets = token_buckets(max_tokens, bucket_spacing)
    top = buckets[-1]
    per_token = (spec.hidden_size + 2 * spec.q_dim + 2 * spec.head_dim) * dtype_bytes + 3 * 8 + 4
    shared = top * per_token + min(top, max_batch) * 16
    z = sum(buckets) * NUM_LORA_MODULES * dtype_bytes * 2 * sum(RANK_BUCKETS)
    return shared + z + peak_step_bytes * max(top, max_batched_tokens) // max_batched_tokens


def profile_peak_step(runner_args: dict, layout: PoolLayout, max_num_seqs: int,
                      max_batched_tokens: int, max_model_len: int) -> int:
    """Peak bytes one eager step of ``max_batched_tokens`` prompt tokens over ``max_num_seqs``
    sequences allocates beyond what exists before it, on a ``ModelRunner`` built from
    ``runner_args`` with a pool just large enough for it (CUDA; freed before returning)."""
    seqs = max(1, min(max_num_seqs, max_batched_tokens))
    lengths = [min(max_batched_tokens // seqs + (i < max_batched_tokens % seqs), max_model_len)
               for i in range(seqs)]
    pages = [layout.kv_pages(n) for n in lengths]
    runner = ModelRunner(num_pages=sum(pages), **runner_args)
    scheduled, first = [], 0
    for i, (n, p) in enumerate(zip(lengths, pages)):
        request = Request(f"profile-{i}", [1] * n, SamplingParams(max_tokens=1))
        request.block_table = list(range(first, first + p))
        request.status = RequestStatus.RUNNING
        first += p
        scheduled.append(ScheduledRequest(request, n))
    device = runner.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    logits = runner.execute(scheduled, {})
    torch.argmax(logits, dim=-1)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del runner, logits
    torch.cuda.empty_cache()
    return peak


@dataclass(frozen=True)
class DeviceSnapshot:
    """The device's memory as an engine starts, before it loads anything."""

    total_bytes: int
    free_bytes: int
    allocated_bytes: int  # torch's, process-wide
    reserved_bytes: int

    @classmethod
    def take(cls, device: torch.device, fraction: float) -> DeviceSnapshot:
        """Measure (blocks cached but unused by other engines of this process count as free),
        and refuse at once if ``fraction`` of the device is not free."""
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        check_share(total, total - free, fraction)
        return cls(total, free, torch.cuda.memory_allocated(device),
                   torch.cuda.memory_reserved(device))


def size_pool(config: EngineConfig, runner_args: dict[str, Any], start: DeviceSnapshot | None,
              graphable: bool, max_model_len: int) -> int:
    """Pages for the pool: from ``cpu_pool_bytes`` on the host (``start`` None), else from this
    engine's share of the device measured since ``start`` (the weights are loaded by now)."""
    layout: PoolLayout = runner_args["layout"]
    page_bytes = layout.spec.num_layers * layout.page_size * torch.finfo(runner_args["dtype"]).bits // 8
    if start is None:  # (a CPU pool may be smaller than one full context: requests are checked)
        return cpu_pool_pages(config.cpu_pool_bytes, page_bytes)
    min_pages = layout.kv_pages(max_model_len)
    device = runner_args["device"]
    weights = torch.cuda.memory_allocated(device) - start.allocated_bytes
    peak = profile_peak_step(runner_args, layout, config.max_num_seqs, config.max_batched_tokens,
                             max_model_len)
    free, _ = torch.cuda.mem_get_info(device)
    grown = torch.cuda.memory_reserved(device) - start.reserved_bytes
    other = max(0, start.free_bytes - free - grown)  # allocated outside torch's allocator
    graphs = graph_bytes(max_batch=min(config.max_num_seqs, BATCH_BUCKETS[-1]),
                         vocab_size=layout.spec.vocab_size, max_model_len=max_model_len,
                         block_tokens=layout.block_tokens, peak_step_bytes=peak) if graphable else 0
    if graphable and config.piecewise_graphs:
        graphs += piecewise_graph_bytes(
            spec=layout.spec, max_batch=config.max_num_seqs, max_tokens=config.piecewise_token_limit,
            dtype_bytes=torch.finfo(runner_args["dtype"]).bits // 8,
            max_batched_tokens=config.max_batched_tokens, peak_step_bytes=peak,
            bucket_spacing=config.piecewise_bucket_tokens)
    # (the Triton kernels' ops keep a table row per page: SlotTables)
    tables = slot_table_bytes_per_page() if runner_args["ops"].global_slots else 0
    plan = plan_pool(total_bytes=start.total_bytes, used_by_others=start.total_bytes - start.free_bytes,
                     fraction=config.gpu_memory_utilization, weights_bytes=weights,
                     peak_step_bytes=peak, page_bytes=page_bytes, table_bytes_per_page=tables,
                     graph_bytes=graphs, other_bytes=other, min_pages=min_pages)
    logger.info("page pool: %s", plan.describe())
    return plan.pages


def split_pool(num_pages: int, adapter_pages: int | None,
               new_pool: Callable[..., PagePool] = PagePool) -> tuple[PagePool, PagePool]:
    """The KV pool and the adapters' pool. Unified paging (``adapter_pages`` None): adapters take
    pages from the same pool as KV. The paper's ablation gives them a fixed partition at the end
    of the pool tensor instead."""
    if adapter_pages is None:
        pool = new_pool(num_pages)
        return pool, pool
    if adapter_pages >= num_pages:
        raise ValueError(f"adapter_pool_pages ({adapter_pages}) must be below the pool's "
                         f"{num_pages} pages")
    return (new_pool(num_pages - adapter_pages),
            new_pool(adapter_pages, first_page=num_pages - adapter_pages))


class CudaTenants:
    """The engines open on each CUDA device of this process, so that the last one to close can
    give back what torch keeps per process: cuBLAS workspaces (32 MiB per (handle, stream) that
    ran a matmul, held by torch's allocator until cleared). They may not go while another engine
    lives: its CUDA graphs replay matmuls that write into the workspaces they were captured with."""

    _lock = threading.Lock()
    _open: dict[int, int] = {}

    @classmethod
    def opened(cls, device: torch.device) -> None:
        with cls._lock:
            cls._open[device.index or 0] = cls._open.get(device.index or 0, 0) + 1

    @classmethod
    def closed(cls, device: torch.device) -> None:
        """One engine on ``device`` closed: free torch's cached blocks, and the cuBLAS
        workspaces too once no engine is left on any device (torch clears them all at once)."""
        with cls._lock:
            cls._open[device.index or 0] -= 1
            last = not any(cls._open.values())
        torch.cuda.synchronize(device)
        if last:
            torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()

