"""What rank 0 sends its workers: small picklable messages, one pipe per worker, in order.

A step is sent once, as the model runner's input in compact form: per scheduled sequence the
tokens it computes (placeholders for tokens still being sampled; their values follow by a
broadcast on the device), its block table and adapter. Page ownership is decided by rank 0 alone;
its allocations and frees ride along (``pool_log``) so every rank can account for its pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SequenceStep:
    """One scheduled sequence, as ``ModelRunner.execute`` reads it."""

    request_id: str
    adapter: str | None
    start: int  # num_computed_tokens
    tokens: list[int]  # tokens start .. start + len(tokens); PENDING where still sampled
    num_tokens: int
    num_pending_tokens: int
    block_table: list[int]
    samples: bool


@dataclass(frozen=True)
class Init:
    """Build the model runner over a pool of ``num_pages`` pages."""

    num_pages: int


@dataclass(frozen=True)
class SizePool:
    """Size this rank's pool (``memory.size_pool``, with rank 0's arguments) and reply with a
    ``PoolSize``; on CUDA the ranks profile a dummy step together."""

    graphable: bool
    max_model_len: int


@dataclass(frozen=True)
class PoolSize:
    """The pages that fit in one rank's share of its device."""

    pages: int


@dataclass(frozen=True)
class Step:
    sequences: list[SequenceStep]
    pending_rows: dict[str, int] | None  # request -> row of the broadcast pending tokens
    num_pending: int
    pool_log: list[tuple] = field(default_factory=list)


@dataclass(frozen=True)
class Place:
    """Adapter ``name`` (registered from ``path``) is resident in ``pages``: copy its shard in."""

    name: str
    path: Path
    pages: list[int]


@dataclass(frozen=True)
class Forget:
    """Adapter ``name`` was unloaded."""

    name: str


@dataclass(frozen=True)
class Report:
    """Reply with a ``PoolReport`` (after applying ``pool_log``)."""

    pool_log: list[tuple] = field(default_factory=list)


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class PoolReport:
    """One rank's view of its pool: free pages and pages by owner kind, resident adapters."""

    rank: int
    num_free: int
    used_by: dict[str, int]
    resident_adapters: int


@dataclass(frozen=True)
class WorkerFailed:
    """A worker's last words: what failed, with its traceback."""

    rank: int
    error: str


@dataclass(frozen=True)
class AdapterFailed:
    """A worker could not read its shard of ``name`` (the file changed since rank 0 read it)."""

    name: str
    error: str
