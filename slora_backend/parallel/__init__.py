"""Tensor parallelism the S-LoRA way: one engine over N devices, LoRA sharded with the model.

``driver`` (rank 0, in the engine process) and ``worker`` (ranks 1 .. N-1) run the forward in
lockstep; ``shards`` says what each rank holds, ``layers`` the collectives between the LoRA ops,
``layout`` and ``adapter_shards`` each rank's pages and adapter rows.
"""

from .driver import TensorParallelDriver, TensorParallelError, TensorParallelRunner
from .shards import TensorParallelShard, check_tensor_parallel

__all__ = ["TensorParallelDriver", "TensorParallelError", "TensorParallelRunner",
           "TensorParallelShard", "check_tensor_parallel"]
