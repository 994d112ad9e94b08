"""The collectives of one tensor-parallel group, with counters of what LoRA adds to them."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

HOST = "127.0.0.1"
# The longest any collective (or joining the group) may wait. A peer that dies closes its
# sockets and fails gloo's collectives at once; this bounds what nothing else would notice.
COLLECTIVE_TIMEOUT_S = 120.0


@dataclass
class CommCounters:
    """Bytes each rank contributed to collectives since the last ``reset``: the base model's
    all-reduces, and LoRA's own (the all-gathers and all-reduces of ``[tokens, r]`` shrinks)."""

    base_bytes: int = 0
    base_calls: int = 0
    lora_bytes: int = 0
    lora_calls: int = 0

    def reset(self) -> None:
        self.base_bytes = self.base_calls = self.lora_bytes = self.lora_calls = 0


class Communicator:
    """One process group (gloo on CPU, NCCL on CUDA) of its own, not torch's default group, so
    that several engines (and tests) can live in one process."""

    def __init__(self, group: dist.ProcessGroup, rank: int, world: int) -> None:
        self.group = group
        self.rank = rank
        self.world = world
        self.counters = CommCounters()

    @classmethod
    def connect(cls, store: dist.Store, rank: int, world: int, device: torch.device,
                timeout_s: float) -> Communicator:
        """Join the group (blocks until every rank has joined, at most ``timeout_s``)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            group = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), rank, world, options)
        else:
            group = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, world, timeout)
        return cls(group, rank, world)

    def all_reduce(self, tensor: torch.Tensor, lora: bool = False) -> None:
        """Sum ``tensor`` over the ranks, in place."""
        self._count(tensor, lora)
        self.group.allreduce([tensor]).wait()

    def gather_interleaved(self, z: torch.Tensor) -> torch.Tensor:
        """``[..., n]`` from every rank -> ``[..., n * world]`` with rank k's column j at
        ``j * world + k`` (the order of A's rows split ``k, k + N, ...``; see ``shards``)."""
        z = z.contiguous()
        self._count(z, lora=True)
        parts = [torch.empty_like(z) for _ in range(self.world)]
        self.group.allgather([parts], [z]).wait()
        return torch.stack(parts, dim=-1).flatten(-2)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's ``tensor`` into every rank's (same shape and dtype), in place."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([tensor], options).wait()

    def abort(self) -> None:
        """Make collectives blocked on a dead peer fail (NCCL; gloo fails by itself when a peer's
        socket closes)."""
        abort = getattr(self.group, "abort", None)
        if abort is not None:
            try:
                abort()
            except Exception:  # best effort: the group is being given up anyway
                pass

    def _count(self, tensor: torch.Tensor, lora: bool) -> None:
        size = tensor.numel() * tensor.element_size()
        if lora:
            self.counters.lora_bytes += size
            self.counters.lora_calls += 1
        else:
            self.counters.base_bytes += size
            self.counters.base_calls += 1
