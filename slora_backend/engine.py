"""The S-LoRA engine: wires model, pool, adapters, scheduler, sampler; offline and streaming APIs.

Thread model: ``add_request`` and ``abort`` may be called from any thread; they only put work
into an inbox. The engine loop (``EngineLoop``: ``start()``, or ``generate()`` inline) is the only
code that touches the scheduler and the pool. Adapters (names, host copies, pool residency) live in
``adapters.AdapterManager``; unloading one takes the step lock, so it never runs in the middle of
a step. ``close()`` (or leaving ``with Engine(...) as engine:``) stops the loop and
gives the engine's GPU memory back; every call that would use the engine afterwards raises
``EngineClosedError``.
"""

from __future__ import annotations

import gc
import itertools
import threading
import time
from collections.abc import Sequence

import torch

from .adapters import AdapterInfo, AdapterManager
from .adapters.host_store import AdapterStore
from .config import EngineConfig, SamplingParams
from .engine_loop import EngineLoop
from .errors import EngineClosedError, EngineOverloadedError, InvalidRequestError
from .layout import PoolLayout
from .memory import CudaTenants, DeviceSnapshot, size_pool, split_pool
from .model_loader import load_model, load_tokenizer
from .model_runner import ModelRunner
from .offline import generate
from .ops import make_ops
from .output_stream import OutputCallback
from .outputs import OutputProcessor, eos_token_ids
from .page_pool import PagePool
from .parallel import TensorParallelDriver
from .request import Request, RequestOutput
from .request_check import RequestChecker
from .sampler import Sampler
from .scheduler import ScheduledRequest, Scheduler
from .stats import EngineStats, engine_stats
from .step_clock import DeviceClock, StepClock
from .step_in_flight import StepInFlight
from .step_launch import StepLauncher
from .warm_up import warm_up


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        dtype = config.torch_dtype
        torch.manual_seed(config.seed)
        self._closed = False
        # (before the weights load: they come out of this engine's share)
        start = (DeviceSnapshot.take(self.device, config.gpu_memory_utilization)
                 if config.pool_pages is None and self.device.type == "cuda" else None)
        self.tokenizer = load_tokenizer(config.tokenizer) if config.tokenizer else None
        min_vocab = len(self.tokenizer) if self.tokenizer else 0
        # Tensor parallelism: this process is rank 0 and holds rank 0's shard of everything.
        self.tp = TensorParallelDriver(config, min_vocab) if config.tensor_parallel_size > 1 else None
        self.model, model_dir = (self.tp.load_model(dtype) if self.tp else load_model(
            config.base_model, dtype, self.device, config.seed, min_vocab=min_vocab))
        self.spec = self.tp.shard.spec if self.tp else self.model.spec  # (the whole model's shape)
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(model_dir, optional=True)
        if self.tokenizer is not None and len(self.tokenizer) > self.spec.vocab_size:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens, the model's vocabulary {self.spec.vocab_size}"
            )
        self.max_model_len = min(config.max_model_len or self.spec.max_position_embeddings,
                                 self.spec.max_position_embeddings)
        self.layout = (self.tp.layout(config.block_tokens) if self.tp
                       else PoolLayout(self.spec, config.block_tokens))
        ops = make_ops(config.resolved_kernel_backend, config.lora_ops, self.device,
                       config.split_k_shrink, config.overlap_lora_shrink)
        # Graphs need ops that never sync with the host (a capability of the ops, not a name);
        # not yet under tensor parallelism (the graphs would capture the collectives).
        graphable = (config.cuda_graphs and self.device.type == "cuda" and ops.graph_capturable
                     and self.tp is None)
        runner_args = dict(model=self.model, layout=self.layout, ops=ops, device=self.device,
                           dtype=dtype)
        # (the profiled dummy step reads no adapter: it gets an empty store of its own)
        # (under tensor parallelism every rank sizes its own pool; all get the least)
        num_pages = config.pool_pages or (self.tp.size_pool if self.tp else size_pool)(
            config, {**runner_args, "store": AdapterStore(self.layout, dtype, 0, False)}, start,
            graphable, self.max_model_len)
        self.pool, adapter_pool = split_pool(num_pages, config.adapter_pool_pages,
                                             self.tp.page_pool if self.tp else PagePool)
        self._inbox: list[Request] = []
        self._aborts: list[str] = []
        self._inbox_lock = threading.Lock()
        self._wakeup = threading.Condition(self._inbox_lock)
        # (``step`` looked up at each call: a profiler may wrap it on the instance)
        self.loop = EngineLoop(lambda: self.step(), self._idle_while_reading, self._has_work,
                               self._wakeup, self._end_all)
        self.adapters = AdapterManager(
            self.layout, adapter_pool, dtype, adapter_root=config.adapter_root,
            hf_hub_cache=config.hf_hub_cache,
            host_budget_bytes=config.host_adapter_bytes,
            pin_memory=config.pin_host_memory and self.device.type == "cuda",
            preload=config.preload_adapters, prefetch=config.prefetch_adapters,
            max_prefetch=config.max_num_seqs, store_type=self.tp.store_type if self.tp else AdapterStore,
            active_counts=self._active_counts, between_steps=self.loop.between_steps)
        admit_wait = config.admit_wait_steps
        self.scheduler = Scheduler(self.pool, self.adapters.cache, self.layout.block_tokens,
                                   config.max_num_seqs, config.max_batched_tokens,
                                   config.slo_ttft_s if config.early_abort else None,
                                   adapter_ready=self.adapters.ready,
                                   admit_wait_steps=(8 if graphable else 0) if admit_wait is None
                                   else admit_wait,
                                   wait_only_when_full=config.admit_wait_only_when_full,
                                   lifo_after_s=config.newest_first_after_s,
                                   cheap_step_tokens=(config.piecewise_token_limit
                                                      if graphable and config.piecewise_graphs else 0))
        self.runner = ModelRunner(num_pages=num_pages, **runner_args, store=self.adapters.store,
                                  graphs_for=((config.max_num_seqs, self.max_model_len)
                                              if graphable else None),
                                  piecewise_for=((config.max_num_seqs, config.piecewise_token_limit,
                                                  config.piecewise_bucket_tokens)
                                                 if graphable and config.piecewise_graphs else None))
        if self.tp is not None:  # every rank's runner over the same pages; rank 0's sends them work
            self.runner = self.tp.attach(self.runner, num_pages, self.adapters.reads.record_failure)
        # Adapters are copied into their pages off the engine thread on CUDA.
        self.adapters.attach_runner(self.runner.copy_adapter, self.runner.forget_adapter,
                                    background=self.device.type == "cuda")
        self.sampler = Sampler(self.device, config.seed)
        self.clock = StepClock()  # where the stepping time goes, by kind of step (stats)
        self.device_clock = DeviceClock()  # ... and the device's time, with its gaps (CUDA)
        self.launcher = StepLauncher(self.runner, self.sampler, self.adapters.cache, self.device,
                                     self.clock)
        self.checker = RequestChecker(self.tokenizer, self.spec.vocab_size, self.max_model_len,
                                      self.layout, self.pool, adapter_pool)
        self.outputs = OutputProcessor(self.scheduler, self.sampler, self.tokenizer,
                                       eos_token_ids(self.tokenizer, self.spec.hf_config),
                                       self._inbox_lock, self.abort)
        self._ids = itertools.count()
        self.steps = 0
        self._in_flight: StepInFlight | None = None  # launched, its tokens not read yet
        if self.runner.graphs is not None:  # every batch size, base model and registered ranks
            self.runner.graphs.capture_all(self.adapters.graph_variants())
        if self.runner.piecewise is not None:
            self.runner.piecewise.capture_all(self.adapters.graph_variants())
        if config.warm_up and self.device.type == "cuda":
            self._warm_up()
        self.adapters.start_preloads()
        if self.device.type == "cuda":
            CudaTenants.opened(self.device)  # (close() gives back what this process keeps)

    def _warm_up(self) -> None:
        warm_up(self)

    @property
    def eos_ids(self) -> set[int]:
        """Token ids that end a request (unless it ignores EOS)."""
        return self.outputs.eos_ids

    @eos_ids.setter
    def eos_ids(self, ids: set[int]) -> None:
        self.outputs.eos_ids = ids

    # ---- adapters (the serving layer's API; ``AdapterManager`` does the work) ---------------

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Register the adapter at ``path`` (under the adapter root) as ``name``; loading a name
        again with the same path describes it, with another path is refused."""
        self._check_open()
        return self.adapters.load(name, path)

    def unload_adapter(self, name: str) -> None:
        """Unregister ``name`` (refused while requests use it); frees its pool pages."""
        self._check_open()
        self.adapters.unload(name)

    # (listing and describing read only the host-side registry, which stays readable after
    # close(); loading, unloading and resolving change it, so a closed engine refuses them)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.adapters.list()

    def describe_adapter(self, name: str) -> AdapterInfo:
        return self.adapters.describe(name)

    def resolve_adapter(self, name: str) -> AdapterInfo:
        """The adapter called ``name``: registered, or loaded from ``<adapter_root>/<name>``."""
        self._check_open()
        return self.adapters.resolve(name)

    def _active_counts(self) -> dict[str, int]:
        counts = self.scheduler.pinned_adapters()  # copies the queues atomically (GIL)
        with self._inbox_lock:
            for r in self._inbox:
                if r.adapter is not None:
                    counts[r.adapter] = counts.get(r.adapter, 0) + 1
        return counts

    # ---- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        lora_name: str | None = None,
        request_id: str | None = None,
        on_output: OutputCallback | None = None,
    ) -> str:
        """Validate and enqueue one request; returns its id. Raises on bad input, enqueues nothing."""
        self._check_open()
        if self.tp is not None:
            self.tp.check()  # a dead rank: refused, naming it
        params = params or SamplingParams()
        token_ids = self.checker.token_ids(prompt)
        entry = self.adapters.entry_for(lora_name) if lora_name else None
        self.checker.check(token_ids, params, entry)
        limit = self.config.max_waiting
        if limit is not None and len(self.scheduler.waiting) + len(self._inbox) >= limit:
            raise EngineOverloadedError(
                f"{limit} requests are already waiting (max_waiting); try again later")
        request_id = request_id or f"req-{next(self._ids)}"
        request = Request(request_id, token_ids, params, entry.name if entry is not None else None)
        with self._wakeup:
            if request_id in self.outputs:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self.outputs.open(request, on_output)
            self._inbox.append(request)
            self._wakeup.notify()
        return request_id

    def abort(self, request_id: str) -> None:
        """End ``request_id`` (aborted) at the next step; an unknown or finished id is ignored,
        and so is every id once the engine is closed (close() ended every request)."""
        if self._closed:
            return
        with self._wakeup:
            self._aborts.append(request_id)
            self._wakeup.notify()

    # ---- offline API --------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_names: Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (one adapter name, or None, per prompt); results in order."""
        self._check_open()
        return generate(self, prompts, sampling_params, lora_names)

    def run_until(self, done: threading.Event) -> None:
        """Drive the engine until ``done`` is set (``EngineLoop.run_until``)."""
        self.loop.run_until(done)

    # ---- the loop -----------------------------------------------------------------------------

    def start(self) -> None:
        """Step on a thread of the engine's own from now on."""
        self._check_open()
        self.loop.start()

    def stop(self) -> None:
        """Stop the loop thread (its open requests end, aborted) and the adapter helper threads."""
        self.loop.stop()
        self.adapters.stop()

    def _has_work(self) -> bool:
        """Anything for a step to do (the inbox lock held)."""
        return bool(self._inbox or self._aborts or self.scheduler.has_work()
                    or self._in_flight is not None)

    def _end_all(self) -> None:
        """End every request the engine holds, as aborted (the step lock held)."""
        if self._in_flight is not None:
            self._in_flight.read()  # (its requests end below)
            self._in_flight = None
            self.device_clock.drained()
        self._drain_inbox()
        for request in self.outputs.live_requests():
            self._finish(request, "abort")

    # ---- closing ------------------------------------------------------------------------------

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the loop, end every open request (aborted), stop the tensor-parallel workers and
        give back the engine's memory: pool, weights, CUDA graphs, LoRA tables, copy stream.
        Idempotent; afterwards the engine refuses new work (``EngineClosedError``)."""
        if self._closed:
            return
        self.stop()
        with self.loop.step_lock:
            self._end_all()
            self._closed = True
            # (the objects that hold device memory; the host-side registry stays readable)
            del self.runner, self.model, self.launcher
            self.adapters.detach_runner()
        if self.tp is not None:
            self.tp.shutdown()
        gc.collect()
        if self.device.type == "cuda":
            CudaTenants.closed(self.device)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine is closed (close() was called); start a new Engine")

    def step(self) -> list[RequestOutput]:
        """Admit new work, launch one forward over the scheduled batch, emit the outputs of the
        step launched before it (``step_in_flight``: the GPU runs one step while the host
        prepares the next and finishes the last)."""
        with self.loop.step_lock, self.clock.step():
            self._check_open()
            outputs = self._drain_inbox()
            # Pages freed while the step in flight runs may still be written by it: copies into
            # free pages wait for it on the GPU.
            fence = self._in_flight.done if self._in_flight is not None else None
            out = self.scheduler.schedule()  # (a request whose adapter failed to read waits)
            for request in out.dropped:
                outputs.append(self._finish(request, "abort", error=(
                    f"dropped: waited past the {self.config.slo_ttft_s}s first-token SLO")))
            # The step waits for the copies of the adapters it reads; prefetches run on.
            if self.adapters.before_launch({s.request.adapter for s in out.scheduled}, fence):
                # a read or a copy found an adapter file damaged: its requests end here
                outputs += self.adapters.end_unreadable(
                    [*(s.request for s in out.scheduled), *self.scheduler.waiting],
                    lambda request, why: self._finish(request, "error", error=why))
                out.scheduled = [s for s in out.scheduled if not s.request.finished]
            launched = self._launch(out.scheduled, outputs) if out.scheduled else None
            # (overlaps the step just launched, on CUDA)
            self.adapters.prefetch_for(self.scheduler.prefetch_order(), len(self.scheduler.running),
                                       fence)
            if self._in_flight is not None:
                with self.clock.charging(self._in_flight.kind):  # (the GPU finishing that step)
                    self._in_flight.wait()
                self.device_clock.finished(self._in_flight)
                outputs += self.outputs.process(self._in_flight)
            self._in_flight = launched
            if launched is None:
                self.device_clock.drained()
            return [o for o in outputs if o is not None]

    def _launch(self, scheduled: list[ScheduledRequest],
                outputs: list[RequestOutput | None]) -> StepInFlight | None:
        """Launch the step (``StepLauncher``); requests whose part failed end with the error."""
        launched = self.launcher.launch(
            scheduled, self._in_flight.pending() if self._in_flight is not None else None)
        for s, error in launched.failed:
            outputs.append(self._finish(s.request, "error", error=f"engine step failed: {error}"))
        if launched.in_flight is not None:
            self.steps += 1
        return launched.in_flight

    def _drain_inbox(self) -> list[RequestOutput]:
        with self._wakeup:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        outputs = []
        for request in inbox:
            # (admitting starts reading the adapter from disk now)
            if request.adapter is not None and not self.adapters.admit(request.adapter):
                outputs.append(self._finish(request, "error", error=(
                    f"adapter {request.adapter!r} was unloaded before the request started")))
                continue
            self.scheduler.add(request)
        for request_id in aborts:
            request = self.outputs.request(request_id)
            if request is not None:
                outputs.append(self._finish(request, "abort"))
        return outputs

    def _idle_while_reading(self) -> None:
        """Nothing runs and the queue waits for adapter reads: pause instead of spinning (the
        reader threads need the GIL too)."""
        if not self.scheduler.running and self.adapters.reading:
            time.sleep(1e-3)

    def _finish(self, request: Request, reason: str, delta_tokens: list[int] | None = None,
                error: str | None = None) -> RequestOutput:
        return self.outputs.finish(request, reason, delta_tokens, error)

    # ---- introspection ------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        self._check_open()
        return engine_stats(self)
