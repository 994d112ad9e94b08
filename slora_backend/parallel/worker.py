"""A tensor-parallel worker: ranks 1 .. N-1, each its own process, driven by rank 0.

It holds its shard of the model, of the KV pages and of every resident adapter, and runs the
forward of every step rank 0 sends, in lockstep with it (the collectives pair the ranks up). It
never schedules, samples or allocates. It exits when rank 0 says so, when rank 0's pipe closes
or its parent process is gone, or when a step fails (its peers' collectives then fail too).
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from multiprocessing.connection import Connection

import torch

from ..adapters.gpu_cache import ResidentAdapter
from ..adapters.host_store import AdapterStore
from ..config import EngineConfig
from ..errors import AdapterLoadError
from ..memory import DeviceSnapshot, size_pool
from ..model_runner import ModelRunner, PendingTokens
from ..ops import make_ops
from ..scheduler import ScheduledRequest
from .adapter_shards import ShardedAdapterStore
from .comm import COLLECTIVE_TIMEOUT_S, HOST, Communicator
from .layers import full_spec, load_model_shard
from .layout import ShardedPoolLayout
from .messages import (
    AdapterFailed,
    Forget,
    Init,
    Place,
    PoolReport,
    PoolSize,
    Report,
    SequenceStep,
    SizePool,
    Step,
    Stop,
    WorkerFailed,
)
from .pool_mirror import PoolMirror
from .shards import TensorParallelShard


class _RemoteRequest:
    """The part of a ``Request`` that ``ModelRunner.execute`` reads, rebuilt from a message."""

    def __init__(self, seq: SequenceStep) -> None:
        self.request_id = seq.request_id
        self.adapter = seq.adapter
        self.num_computed_tokens = seq.start
        self.num_tokens = seq.num_tokens
        self.num_pending_tokens = seq.num_pending_tokens
        self.block_table = seq.block_table
        self._tokens = seq.tokens

    def token_slice(self, start: int, end: int) -> list[int]:
        base = self.num_computed_tokens
        return self._tokens[start - base:end - base]


class _RemoteScheduled(ScheduledRequest):
    """A ``ScheduledRequest`` whose ``samples`` was decided on rank 0."""

    def __init__(self, seq: SequenceStep) -> None:
        super().__init__(_RemoteRequest(seq), len(seq.tokens))  # type: ignore[arg-type]
        self._samples = seq.samples

    @property
    def samples(self) -> bool:
        return self._samples


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """Rank k's device: the k-th CUDA device counted from the configured one, or the CPU."""
    device = torch.device(config.device)
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def _exit_with_parent(parent_pid: int) -> None:
    """Leave as soon as the engine process is gone, even from inside a blocked collective."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(0.5)


class Worker:
    def __init__(self, config: EngineConfig, rank: int, world: int, port: int,
                 conn: Connection, min_vocab: int) -> None:
        self.config = config
        self.conn = conn
        self.device = rank_device(config, rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # (before the weights load: they come out of this rank's share of its device)
        self.start = (DeviceSnapshot.take(self.device, config.gpu_memory_utilization)
                      if config.pool_pages is None and self.device.type == "cuda" else None)
        store = torch.distributed.TCPStore(HOST, port, world, is_master=False)
        self.comm = Communicator.connect(store, rank, world, self.device, COLLECTIVE_TIMEOUT_S)
        self.shard = TensorParallelShard(full_spec(config.base_model, min_vocab), rank, world)
        torch.manual_seed(config.seed)
        self.model, _ = load_model_shard(config.base_model, self.shard, self.comm,
                                         config.torch_dtype, self.device, config.seed)
        self.layout = ShardedPoolLayout(self.shard, config.block_tokens)
        self.ops = make_ops(config.resolved_kernel_backend, config.lora_ops, self.device,
                            config.split_k_shrink, config.overlap_lora_shrink)
        self.runner: ModelRunner | None = None
        self.mirror: PoolMirror | None = None
        self.residents: dict[str, ResidentAdapter] = {}
        self._last_step: torch.cuda.Event | None = None

    def size_pool(self, message: SizePool) -> int:
        """This rank's pages, as rank 0 sizes its own (``Engine``): a profiled step that reads
        no adapter, hence an empty store."""
        c = self.config
        runner_args = dict(model=self.model, layout=self.layout, ops=self.ops, device=self.device,
                           dtype=c.torch_dtype,
                           store=AdapterStore(self.layout, c.torch_dtype, 0, False))
        return size_pool(c, runner_args, self.start, message.graphable, message.max_model_len)

    def init(self, message: Init) -> None:
        c = self.config
        self.store = ShardedAdapterStore(self.layout, c.torch_dtype, c.host_adapter_bytes,
                                         c.pin_host_memory and self.device.type == "cuda")
        self.runner = ModelRunner(self.model, self.layout, message.num_pages, self.ops, self.store,
                                  self.device, c.torch_dtype)
        self.mirror = PoolMirror(message.num_pages)

    def serve(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return  # rank 0 is gone
            if isinstance(message, Stop):
                return
            if isinstance(message, SizePool):
                self.conn.send(PoolSize(self.size_pool(message)))
            elif isinstance(message, Init):
                self.init(message)
            elif isinstance(message, Step):
                self.mirror.replay(message.pool_log)
                self.step(message)
            elif isinstance(message, Place):
                self.place(message)
            elif isinstance(message, Forget):
                self.forget(message.name)
            elif isinstance(message, Report):
                self.mirror.replay(message.pool_log)
                self.conn.send(PoolReport(self.comm.rank, self.mirror.num_free,
                                          dict(self.mirror.used_by), len(self.residents)))

    def step(self, message: Step) -> None:
        pending = None
        if message.pending_rows is not None:
            tokens = torch.empty(message.num_pending, dtype=torch.int64, device=self.device)
            self.comm.broadcast(tokens)
            pending = PendingTokens(tokens, message.pending_rows)
        scheduled = [_RemoteScheduled(seq) for seq in message.sequences]
        residents = {s.adapter: self.residents[s.adapter] for s in message.sequences if s.adapter}
        self.runner.execute(scheduled, residents, pending)  # (rank 0 samples; logits dropped)
        if self.device.type == "cuda":  # copies into pages freed by this step wait for it
            self._last_step = torch.cuda.Event()
            self._last_step.record()

    def place(self, message: Place) -> None:
        name = message.name
        if name in self.store and self.store.get(name).path != message.path:
            self.forget(name)  # re-registered from elsewhere since
        if name not in self.store:  # (rank 0 resolved and confined the path; an id may be org/name)
            self.store.register(name, message.path, hf_id=True)
        resident = self.residents[name] = ResidentAdapter(name, list(message.pages))
        try:
            event = self.runner.copy_adapter(resident, after=self._last_step)
        except AdapterLoadError as e:
            self.conn.send(AdapterFailed(name, str(e)))
            return
        if event is not None:  # the copy ran on the side stream: the next steps wait for it
            torch.cuda.current_stream(self.device).wait_event(event)

    def forget(self, name: str) -> None:
        self.residents.pop(name, None)
        if name in self.store:
            self.store.unregister(name)
        self.runner.forget_adapter(name)


def worker_main(config: EngineConfig, rank: int, world: int, port: int, conn: Connection,
                parent_pid: int, min_vocab: int) -> None:
    """Entry point of a worker process (``multiprocessing`` spawn context)."""
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    try:
        worker = Worker(config, rank, world, port, conn, min_vocab)
        conn.send("ready")
        worker.serve()
    except Exception:
        try:
            conn.send(WorkerFailed(rank, traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)
