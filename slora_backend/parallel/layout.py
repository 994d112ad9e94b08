"""The pool layout of one tensor-parallel rank: every rank's is the same, so are page ids."""

from __future__ import annotations

from ..layout import AdapterRows, PoolLayout
from .shards import ROW_PARALLEL, TensorParallelShard


class ShardedPoolLayout(PoolLayout):
    """A rank's page geometry: KV pages hold its KV heads only; an adapter's pages hold its
    shard's rows (see ``shards``). Row counts and lengths do not depend on which rank, so all
    ranks have the same page size and the same page count per adapter, and the pages that rank 0
    allocates mean the same thing in every rank's pool.

    ``spec`` and ``module_dims`` stay the full model's: adapters are validated against it.
    """

    def __init__(self, shard: TensorParallelShard, block_tokens: int = 16) -> None:
        self.shard = shard
        super().__init__(shard.spec, block_tokens)

    @property
    def kv_heads(self) -> int:
        return self.shard.local_kv_heads

    def row_shape(self, module: str, rank: int) -> AdapterRows:
        in_dim, out_dim = self.module_dims[module]
        world = self.shard.world
        if module in ROW_PARALLEL:  # A split along its input, B^T by output
            return AdapterRows(rank, in_dim // world, rank, out_dim // world)
        out_rows = self.shard.output_slice(module)
        return AdapterRows(-(-rank // world), in_dim, rank, out_rows.stop - out_rows.start)
