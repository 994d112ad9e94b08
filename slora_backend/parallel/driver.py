"""Rank 0 of a tensor-parallel engine: starts and owns the workers, drives them every step.

The engine process is rank 0 (a driver worker, as vLLM's): the scheduler, the adapter registry
and cache, and page allocation run once, there. Each step, ``TensorParallelRunner.execute`` sends
the step to every worker (one pipe each) and then runs rank 0's own share of the forward; the
ranks meet in the forward's collectives. Adapter placements (copy adapter X's shard into pages
P) and unloads go the same way, in order.

Failure: a worker that dies makes rank 0's collectives fail (gloo: at once, its sockets close;
NCCL: a monitor thread aborts the group) or is found dead before the next step is sent. The
step's requests end with an error naming the rank, and the group stays failed: every later step
fails the same way and ``check`` refuses new requests. The group is not restarted (a new engine
is); workers exit when the engine process goes.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..adapters.gpu_cache import ResidentAdapter
from ..config import EngineConfig
from ..errors import SLoRAError
from ..memory import DeviceSnapshot, size_pool
from ..model_runner import ModelRunner, PendingTokens
from ..models.llama import LlamaModel
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
from .pool_mirror import PoolLog, RecordingPagePool
from .shards import TensorParallelShard
from .worker import rank_device, worker_main


@contextlib.contextmanager
def _children_allowed() -> Iterator[None]:
    """Let a daemonic process (the serving layer runs the engine in one) start the workers.

    ``multiprocessing`` forbids daemonic processes to have children because they could not
    clean them up; the workers clean up after themselves (each exits when its parent is gone,
    see ``worker``), so the rule is lifted for their start only."""
    config = mp.current_process()._config
    daemon = config.get("daemon")
    config["daemon"] = False
    try:
        yield
    finally:
        if daemon is not None:
            config["daemon"] = daemon


class TensorParallelError(SLoRAError, RuntimeError):
    """A tensor-parallel rank died or failed; the engine cannot serve (UNAVAILABLE)."""


class TensorParallelDriver:
    """Spawns ranks 1 .. N-1 and joins the group as rank 0. Build it before the model."""

    def __init__(self, config: EngineConfig, min_vocab: int = 0) -> None:
        world = config.tensor_parallel_size
        self.config = config
        self.world = world
        self.device = rank_device(config, 0)
        if self.device.type == "cuda" and torch.cuda.device_count() < (self.device.index or 0) + world:
            raise ValueError(f"tensor_parallel_size {world} needs {world} CUDA devices from "
                             f"{self.device}; this machine has {torch.cuda.device_count()}")
        self.shard = TensorParallelShard(full_spec(config.base_model, min_vocab), 0, world)
        self.pool_log = PoolLog()
        self._failure: str | None = None
        self._stopping = False
        self._send_lock = threading.Lock()
        self.on_adapter_failure: Callable[[str, str], None] = lambda name, why: None
        store = dist.TCPStore(HOST, 0, world, is_master=True, wait_for_workers=False)
        context = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        for rank in range(1, world):
            mine, theirs = context.Pipe()
            proc = context.Process(
                target=worker_main, name=f"slora-tp-rank{rank}", daemon=True,
                args=(config, rank, world, store.port, theirs, os.getpid(), min_vocab))
            with _children_allowed():
                proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)
        self._store = store
        try:
            self.comm = self._connect(store)
        except Exception as e:
            self.shutdown()
            if isinstance(e, TensorParallelError):
                raise
            raise TensorParallelError(self._describe_death(e)) from e
        self._monitor = threading.Thread(target=self._watch_workers, daemon=True,
                                         name="slora-tp-monitor")
        self._monitor.start()

    # ---- start-up -----------------------------------------------------------------------------

    def _connect(self, store: dist.TCPStore) -> Communicator:
        """Join the group as rank 0, giving up as soon as a worker dies while starting (its
        error, if it could send one, is in the message)."""
        joined: list[Communicator | BaseException] = []
        done = threading.Event()

        def join() -> None:
            try:
                joined.append(Communicator.connect(store, 0, self.world, self.device,
                                                   COLLECTIVE_TIMEOUT_S))
            except BaseException as e:  # (handed to the caller)
                joined.append(e)
            done.set()

        threading.Thread(target=join, daemon=True, name="slora-tp-connect").start()
        while not done.wait(0.1):
            for rank, proc in enumerate(self.procs, start=1):
                if proc.exitcode is not None:
                    conn = self.conns[rank - 1]
                    reply = conn.recv() if conn.poll() else None
                    why = f":\n{reply.error}" if isinstance(reply, WorkerFailed) else ""
                    raise TensorParallelError(f"{self._exit_message(rank)} while starting{why}")
        if isinstance(joined[0], BaseException):
            raise joined[0]
        return joined[0]

    def load_model(self, dtype: torch.dtype) -> tuple[LlamaModel, Path | None]:
        """Rank 0's shard of the model; waits until every worker has loaded its own."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        model, model_dir = load_model_shard(self.config.base_model, self.shard, self.comm, dtype,
                                            self.device, self.config.seed)
        for rank in range(1, self.world):
            reply = self._recv(rank)
            if reply != "ready":
                raise TensorParallelError(f"tensor-parallel rank {rank} did not start: {reply}")
        return model, model_dir

    def size_pool(self, config: EngineConfig, runner_args: dict[str, Any],
                  start: DeviceSnapshot | None, graphable: bool, max_model_len: int) -> int:
        """``memory.size_pool`` on every rank at once (their profiled steps meet in the
        collectives), each from its own device's memory; every pool gets the least of their
        page counts, since a page id means the same page on every rank."""
        self._send(SizePool(graphable, max_model_len))
        try:
            own = size_pool(config, runner_args, start, graphable, max_model_len)
        except ValueError:  # a setting leaves no room (the message has the numbers)
            self.shutdown()
            raise
        except Exception as e:  # the profiled step's collectives: a rank died
            self._fail(self._describe_death(e))
            raise TensorParallelError(self._failure) from e
        pages = [own]
        for rank in range(1, self.world):
            reply = self._recv(rank)
            if not isinstance(reply, PoolSize):
                raise TensorParallelError(f"tensor-parallel rank {rank} answered {reply!r}")
            pages.append(reply.pages)
        return min(pages)

    def layout(self, block_tokens: int) -> ShardedPoolLayout:
        return ShardedPoolLayout(self.shard, block_tokens)

    @property
    def store_type(self) -> type[ShardedAdapterStore]:
        """Rank 0's host store: reads rank 0's shard of every adapter."""
        return ShardedAdapterStore

    def page_pool(self, num_pages: int, first_page: int = 0) -> RecordingPagePool:
        return RecordingPagePool(num_pages, self.pool_log, first_page)

    def attach(self, runner: ModelRunner, num_pages: int,
               on_adapter_failure: Callable[[str, str], None]) -> TensorParallelRunner:
        """Have every worker build its runner over ``num_pages`` pages; wrap rank 0's."""
        self.on_adapter_failure = on_adapter_failure
        self._send(Init(num_pages))
        return TensorParallelRunner(runner, self)

    # ---- messages -----------------------------------------------------------------------------

    def check(self) -> None:
        """Raise ``TensorParallelError`` if the group has failed."""
        if self._failure is None:
            for rank, proc in enumerate(self.procs, start=1):
                if proc.exitcode is not None:
                    self._fail(self._exit_message(rank))
                    break
        if self._failure is not None:
            raise TensorParallelError(self._failure)

    def _send(self, message: object) -> None:
        self.check()
        with self._send_lock:
            for rank, conn in enumerate(self.conns, start=1):
                try:
                    conn.send(message)
                except OSError as e:
                    self._fail(self._describe_death(e))
                    raise TensorParallelError(self._failure) from e

    def send_step(self, scheduled: list[ScheduledRequest], residents: dict[str, ResidentAdapter],
                  pending: PendingTokens | None) -> None:
        self._poll_replies()
        sequences = []
        needs_pending = False
        for s in scheduled:
            r = s.request
            start = r.num_computed_tokens
            sequences.append(SequenceStep(
                r.request_id, r.adapter, start, r.token_slice(start, start + s.num_new_tokens),
                r.num_tokens, r.num_pending_tokens, list(r.block_table), s.samples))
            needs_pending |= r.num_pending_tokens > 0
        pending = pending if needs_pending else None
        self._send(Step(sequences, pending.rows if pending else None,
                        int(pending.tokens.shape[0]) if pending else 0, self.pool_log.take()))
        if pending is not None:
            self.collective(lambda: self.comm.broadcast(pending.tokens.contiguous()))

    def send_place(self, resident: ResidentAdapter, path: Path) -> None:
        self._send(Place(resident.name, path, list(resident.pages)))

    def send_forget(self, name: str) -> None:
        self._send(Forget(name))

    def pool_reports(self) -> list[PoolReport]:
        """Every worker's pool as it sees it, after every allocation and free so far."""
        self._send(Report(self.pool_log.take()))
        reports = []
        for rank in range(1, self.world):
            reply = self._recv(rank, skip=AdapterFailed)
            if not isinstance(reply, PoolReport):
                raise TensorParallelError(f"tensor-parallel rank {rank} answered {reply!r}")
            reports.append(reply)
        return reports

    def collective(self, run: Callable[[], object]) -> object:
        """Run rank 0's part of a collective operation; a failure names the dead rank."""
        try:
            return run()
        except TensorParallelError:
            raise
        except Exception as e:
            self._fail(self._describe_death(e))
            raise TensorParallelError(self._failure) from e

    def _recv(self, rank: int, skip: type | None = None) -> object:
        conn, proc = self.conns[rank - 1], self.procs[rank - 1]
        while True:
            ready = wait([conn, proc.sentinel], timeout=COLLECTIVE_TIMEOUT_S)
            if conn not in ready:
                self._fail(self._exit_message(rank) if proc.exitcode is not None
                           else f"tensor-parallel rank {rank} did not answer in {COLLECTIVE_TIMEOUT_S}s")
                raise TensorParallelError(self._failure)
            try:
                reply = conn.recv()
            except (EOFError, OSError):
                proc.join(5)
                self._fail(self._exit_message(rank))
                raise TensorParallelError(self._failure) from None
            if isinstance(reply, WorkerFailed):
                self._fail(f"tensor-parallel rank {rank} failed:\n{reply.error}")
                raise TensorParallelError(self._failure)
            if isinstance(reply, AdapterFailed):
                self.on_adapter_failure(reply.name, reply.error)
            if skip is None or not isinstance(reply, skip):
                return reply

    def _poll_replies(self) -> None:
        """Hand over what workers reported between steps (adapter reads that failed)."""
        for rank, conn in enumerate(self.conns, start=1):
            while conn.poll():
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    break  # (found dead by check)
                if isinstance(reply, AdapterFailed):
                    self.on_adapter_failure(reply.name, reply.error)
                elif isinstance(reply, WorkerFailed):
                    self._fail(f"tensor-parallel rank {rank} failed:\n{reply.error}")

    # ---- failure ------------------------------------------------------------------------------

    def _exit_message(self, rank: int) -> str:
        proc = self.procs[rank - 1]
        code = proc.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return f"tensor-parallel rank {rank} (pid {proc.pid}) {how}"

    def _describe_death(self, error: Exception) -> str:
        """Which rank took the group down: wait briefly for a worker to be seen dead."""
        ended = wait([p.sentinel for p in self.procs], timeout=5.0)
        for rank, proc in enumerate(self.procs, start=1):
            if proc.sentinel in ended:
                proc.join(5)  # (its sockets and sentinel close a moment before it can be reaped)
            if proc.exitcode is not None:
                return f"{self._exit_message(rank)}: {error}"
        return f"tensor-parallel group failed: {error}"

    def _fail(self, message: str) -> None:
        if self._failure is None:
            self._failure = message

    def _watch_workers(self) -> None:
        """Abort the group when a worker dies, so nothing waits on it (NCCL would)."""
        alive = {p.sentinel: p for p in self.procs}
        while alive:
            for sentinel in wait(list(alive)):
                alive.pop(sentinel)
            if self._failure is None and not self._stopping and self.device.type == "cuda":
                self.comm.abort()
                return

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def shutdown(self) -> None:
        """Stop every worker (they also exit by themselves when this process ends)."""
        self._stopping = True
        with self._send_lock:
            for conn in self.conns:
                try:
                    conn.send(Stop())
                except OSError:
                    pass
        for proc in self.procs:
            proc.join(10)
            if proc.exitcode is None:
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()


class TensorParallelRunner:
    """Rank 0's ``ModelRunner`` with every call that changes the forward's inputs sent to the
    workers first: the same methods, for the engine."""

    def __init__(self, local: ModelRunner, driver: TensorParallelDriver) -> None:
        self.local = local
        self.driver = driver
        self.pool = local.pool
        self.graphs = local.graphs
        self.piecewise = local.piecewise  # (None: no graphs under tensor parallelism yet)
        self.lora_tables = local.lora_tables
        self.slot_tables = local.slot_tables
        self.store = local.store
        self.copy_clock = local.copy_clock  # (rank 0's copies; the workers copy alike)

    def execute(self, scheduled: list[ScheduledRequest], residents: dict[str, ResidentAdapter],
                pending: PendingTokens | None = None) -> torch.Tensor:
        self.driver.send_step(scheduled, residents, pending)
        return self.driver.collective(lambda: self.local.execute(scheduled, residents, pending))

    def copy_adapter(self, resident: ResidentAdapter,
                     after: torch.cuda.Event | None = None) -> torch.cuda.Event | None:
        try:
            self.driver.send_place(resident, self.store.get(resident.name).path)
        except TensorParallelError:
            pass  # (the next step reports the failure and ends its requests)
        return self.local.copy_adapter(resident, after)

    def forget_adapter(self, name: str) -> None:
        self.local.forget_adapter(name)
        if not self.driver.failed:
            self.driver.send_forget(name)
