"""The S-LoRA engine: wires model, pool, adapters, scheduler, sampler; offline and streaming APIs.

Thread model: ``add_request`` and ``abort`` may be called from any thread; they only put work
into an inbox. The engine loop (``start()``, or ``generate()`` inline) is the only code that
touches the scheduler and the pool. Adapter management takes the step lock, so it never runs in
the middle of a step.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from .adapter_cache import AdapterCache
from .adapter_copier import AdapterCopier
from .adapter_registry import AdapterInfo, AdapterRegistry
from .adapter_store import AdapterStore
from .config import EngineConfig, SamplingParams
from .errors import EngineOverloadedError, InvalidRequestError
from .host_reads import HostReads
from .layout import PoolLayout
from .model_loader import load_model, load_tokenizer
from .model_runner import ModelRunner
from .ops import make_ops
from .output_stream import OutputCallback, OutputStream
from .page_pool import ADAPTER, KV, PagePool
from .request import Request, RequestOutput
from .sampler import Sampler
from .scheduler import ScheduledRequest, Scheduler
from .step_in_flight import StepInFlight


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    pool_pages_total: int
    pool_pages_free: int
    pool_pages_kv: int
    pool_pages_adapter: int
    adapter_partition_pages: int  # 0 with unified paging
    adapters_registered: int
    adapters_gpu: int
    adapters_host: int
    adapter_loads: int
    adapter_evictions: int
    adapter_hits: int
    adapter_misses: int
    adapter_prefetches: int
    generated_tokens: int
    finished_requests: int
    preemptions: int
    steps: int
    decode_graphs: int  # CUDA graphs captured so far (one per batch/rank/context bucket)
    graph_steps: int  # decode steps replayed from a graph

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        dtype = config.torch_dtype
        torch.manual_seed(config.seed)
        self.tokenizer = load_tokenizer(config.tokenizer) if config.tokenizer else None
        min_vocab = len(self.tokenizer) if self.tokenizer else 0
        # Tensor parallelism: this process is rank 0 and holds rank 0's shard of everything.
        self.tp = None
        if config.tensor_parallel_size > 1:
            from .parallel import TensorParallelDriver

            self.tp = TensorParallelDriver(config, min_vocab)
            self.model, model_dir = self.tp.load_model(dtype)
            self.spec = self.tp.shard.spec  # the whole model's shape
        else:
            self.model, model_dir = load_model(config.base_model, dtype, self.device, config.seed,
                                               min_vocab=min_vocab)
            self.spec = self.model.spec
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
        num_pages = config.pool_pages or self._auto_pool_pages(dtype)
        adapter_pages = config.adapter_pool_pages
        if adapter_pages is not None and adapter_pages >= num_pages:
            raise ValueError(f"adapter_pool_pages ({adapter_pages}) must be below the pool's "
                             f"{num_pages} pages")
        new_pool = self.tp.page_pool if self.tp else PagePool
        self.pool = new_pool(num_pages - (adapter_pages or 0))
        # Unified paging: adapters take pages from the same pool as KV. The ablation gives them
        # a fixed partition at the end of the pool tensor instead.
        adapter_pool = self.pool if adapter_pages is None else new_pool(
            adapter_pages, first_page=num_pages - adapter_pages)
        self.store = (self.tp.adapter_store if self.tp else AdapterStore)(
            self.layout, dtype, config.host_adapter_bytes,
            config.pin_host_memory and self.device.type == "cuda")
        self.adapters = AdapterCache(adapter_pool, self.store,
                                     copying=lambda name: self.copier.in_flight(name))
        self.registry = AdapterRegistry(config.adapter_root, self.store, self.adapters)
        # Graphs need ops that never sync with the host: the Triton kernels, not the references.
        # (not yet under tensor parallelism: the decode graphs would capture the collectives)
        graphable = (config.cuda_graphs and self.device.type == "cuda" and self.tp is None
                     and config.resolved_kernel_backend == "triton" and not config.lora_ops)
        admit_wait = config.admit_wait_steps
        self.scheduler = Scheduler(self.pool, self.adapters, self.layout.block_tokens,
                                   config.max_num_seqs, config.max_batched_tokens,
                                   config.slo_ttft_s if config.early_abort else None,
                                   adapter_ready=self._adapter_ready,
                                   admit_wait_steps=(8 if graphable else 0) if admit_wait is None
                                   else admit_wait)
        self.runner = ModelRunner(
            self.model, self.layout, num_pages,
            make_ops(config.resolved_kernel_backend, config.lora_ops), self.store, self.device, dtype,
            graphs_for=(config.max_num_seqs, self.max_model_len) if graphable else None,
        )
        # Reads adapters of queued requests from disk into host memory off the engine thread,
        # and copies them into their pages (on CUDA) off it too.
        self.host_reads = HostReads(self.store)
        if self.tp is not None:  # every rank's runner over the same pages; rank 0's sends them work
            self.runner = self.tp.attach(self.runner, num_pages, self.host_reads.record_failure)
        self.copier = AdapterCopier(self.runner.copy_adapter, self.host_reads.record_failure,
                                    background=self.device.type == "cuda")
        self.sampler = Sampler(self.device, config.seed)
        self.eos_ids = self._eos_ids()
        self._streams: dict[str, OutputStream] = {}  # every request from add_request to its end
        self._inbox: list[Request] = []
        self._aborts: list[str] = []
        self._inbox_lock = threading.Lock()
        self._wakeup = threading.Condition(self._inbox_lock)
        self._step_lock = threading.RLock()
        self._step_lock_waiters = 0  # threads in _between_steps(); the loop yields to them
        self._registry_lock = threading.Lock()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.generated_tokens = 0
        self.finished_requests = 0
        self.steps = 0
        self._in_flight: StepInFlight | None = None  # launched, its tokens not read yet
        self.registry.restore()
        if self.runner.graphs is not None:  # every batch size, base model and registered ranks
            entries = [self.store.get(n) for n in self.store.names()]
            self.runner.graphs.capture_all([(0, None)] + [(e.rank, e.targets) for e in entries])
        if config.warm_up and self.device.type == "cuda":
            self._warm_up()
        if config.preload_adapters:
            self.host_reads.preload(self.store.names())

    def _warm_up(self) -> None:
        """Compile the kernels' variants before serving: for the base model and one adapter of
        each registered rank (the batch's largest rank picks LoRA tiles), prompts short and long
        enough for each prefill tile, joining a batch that already decodes (a mixed step)."""
        by_rank: dict[int, str] = {}
        for name in self.store.names():
            by_rank.setdefault(self.store.get(name).rank, name)
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        vocab = self.spec.vocab_size
        lengths = [n for n in (8, 24, 100) if n + params.max_tokens <= self.max_model_len]
        for name in [None, *(by_rank[r] for r in sorted(by_rank))]:
            ids = []
            for length in lengths:
                prompt = [1 + (7 * i) % (vocab - 1) for i in range(length)]
                try:
                    ids.append(self.add_request(prompt, params, name))
                except InvalidRequestError:  # a pool too small for it: that variant waits
                    continue
                self.step()
            while any(i in self._streams for i in ids):
                self.step()
                self._idle_while_reading()
            if name is not None:
                self.store.get(name).total_requests -= len(ids)  # not a user's requests
        self.generated_tokens = self.finished_requests = self.steps = 0

    # ---- sizing -------------------------------------------------------------------------------

    def _auto_pool_pages(self, dtype: torch.dtype) -> int:
        page_bytes = self.spec.num_layers * self.layout.page_size * torch.finfo(dtype).bits // 8
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if self.tp is not None:
                free = self.tp.min_free_bytes(free)
            # Leave room for activations of the largest step (a few hundred MB at most here).
            budget = int(free * self.config.pool_memory_fraction) - 2 * 2**30
        else:
            budget = self.config.cpu_pool_bytes
        if budget < page_bytes:
            raise ValueError(f"no memory for the page pool: one page needs {page_bytes} bytes")
        return budget // page_bytes

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        cfg = self.spec.hf_config
        eos = getattr(cfg, "eos_token_id", None)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(eos)
        return ids

    # ---- adapters -----------------------------------------------------------------------------

    # Registering, listing and describing only add to or read the store's dict of entries, which
    # the engine thread reads but never iterates: they take the registry lock, not the step lock,
    # so a busy engine never delays them (the ensemble resolves an adapter for every request).

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        with self._registry_lock:
            info = self.registry.load(name, path, self._active_counts())
        if self.config.preload_adapters:
            self.host_reads.preload([name])
        return info

    def unload_adapter(self, name: str) -> None:
        """Unregister ``name`` (refused while requests use it); frees its pool pages."""
        with self._registry_lock, self._between_steps():
            self.copier.wait([name])  # its pages go back to the pool: no copy may still write them
            self.registry.unload(name, self._active_counts())
            self.runner.forget_adapter(name)

    def list_adapters(self) -> list[AdapterInfo]:
        with self._registry_lock:
            return self.registry.list(self._active_counts())

    def describe_adapter(self, name: str) -> AdapterInfo:
        with self._registry_lock:
            return self.registry.describe(name, self._active_counts())

    def resolve_adapter(self, name: str) -> AdapterInfo:
        """The adapter called ``name``: registered, or loaded from ``<adapter_root>/<name>``."""
        with self._registry_lock:
            return self.registry.resolve(name, self._active_counts())

    @contextlib.contextmanager
    def _between_steps(self) -> Iterator[None]:
        """Hold the step lock from another thread. Python's locks are not fair: the engine thread
        re-takes the lock right after each step and would win every race against a waiter, so
        it yields between steps while anyone is waiting here."""
        with self._inbox_lock:
            self._step_lock_waiters += 1
        try:
            with self._step_lock:
                yield
        finally:
            with self._inbox_lock:
                self._step_lock_waiters -= 1

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
        params = params or SamplingParams()
        if self.tp is not None:
            self.tp.check()  # a dead rank: refused, naming it
        token_ids = self._tokenize(prompt)
        if len(token_ids) + params.max_tokens > self.max_model_len:
            if len(token_ids) >= self.max_model_len:
                raise InvalidRequestError(
                    f"prompt has {len(token_ids)} tokens; the context holds {self.max_model_len}"
                )
            raise InvalidRequestError(
                f"max_tokens {params.max_tokens} is above the limit: the prompt has "
                f"{len(token_ids)} tokens, so at most {self.max_model_len - len(token_ids)} can follow "
                f"within the {self.max_model_len}-token context"
            )
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this model has none")
        adapter = None
        if lora_name:
            # A registered name needs no step lock (the common case under load); only a first
            # use, which loads the adapter, waits for the current step to end.
            adapter = lora_name if lora_name in self.store else self.resolve_adapter(lora_name).name
        worst = self.layout.kv_pages(len(token_ids) + params.max_tokens)
        adapter_pages = self.store.get(adapter).plan.num_pages if adapter is not None else 0
        if self.scheduler.unified:
            worst += adapter_pages
        elif adapter_pages > self.adapters.pool.num_pages:
            raise InvalidRequestError(f"adapter {adapter!r} needs {adapter_pages} pages, the "
                                      f"adapter partition has {self.adapters.pool.num_pages}")
        if worst > self.pool.num_pages:
            raise InvalidRequestError(
                f"request needs up to {worst} pages but the pool has {self.pool.num_pages}"
            )
        limit = self.config.max_waiting
        if limit is not None and len(self.scheduler.waiting) + len(self._inbox) >= limit:
            raise EngineOverloadedError(
                f"{limit} requests are already waiting (max_waiting); try again later")
        request_id = request_id or f"req-{next(self._ids)}"
        request = Request(request_id, token_ids, params, adapter)
        with self._wakeup:
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = OutputStream(request, self.tokenizer, on_output)
            self._inbox.append(request)
            self._wakeup.notify()
        return request_id

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: give prompts as token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise InvalidRequestError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {self.spec.vocab_size})"
            )
        return ids

    def abort(self, request_id: str) -> None:
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
        n = len(prompts)
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            params = [sampling_params or SamplingParams()] * n
        else:
            params = list(sampling_params)
        names = list(lora_names) if lora_names is not None else [None] * n
        if len(params) != n or len(names) != n:
            raise InvalidRequestError(
                f"{n} prompts need {n} sampling params and lora names, got {len(params)} and {len(names)}"
            )
        results: dict[str, RequestOutput] = {}
        done = threading.Event()

        def collect(out: RequestOutput) -> None:
            if out.finished:
                results[out.request_id] = out
                if len(results) == n:
                    done.set()

        ids = [self.add_request(p, sp, name, on_output=collect)
               for p, sp, name in zip(prompts, params, names)]
        if n == 0:
            return []
        if self._thread is not None:
            done.wait()
        else:
            while not done.is_set():
                self.step()
                self._idle_while_reading()
        return [results[i] for i in ids]

    # ---- the loop -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="slora-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.host_reads.shutdown()  # no read outlives the loop
        self.copier.wait()

    def close(self) -> None:
        """Stop the loop and, under tensor parallelism, the worker processes."""
        self.stop()
        if self.tp is not None:
            self.tp.shutdown()

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not (self._stopping or self._inbox or self._aborts
                           or self.scheduler.has_work() or self._in_flight is not None):
                    self._wakeup.wait()
                if self._stopping:
                    break
            self.step()
            self._idle_while_reading()
            while self._step_lock_waiters:
                time.sleep(1e-4)
        with self._step_lock:  # a stopped engine leaves nothing behind
            if self._in_flight is not None:
                self._in_flight.read()  # (its requests end below, as aborted)
                self._in_flight = None
            self._drain_inbox()
            for stream in list(self._streams.values()):
                self._finish(stream.request, "abort")

    def step(self) -> list[RequestOutput]:
        """Admit new work, launch one forward over the scheduled batch, emit the outputs of the
        step launched before it (``step_in_flight``: the GPU runs one step while the host
        prepares the next and finishes the last)."""
        with self._step_lock:
            outputs = self._drain_inbox()
            # Pages freed while the step in flight runs may still be written by it: copies into
            # free pages wait for it on the GPU.
            fence = self._in_flight.done if self._in_flight is not None else None
            out = self.scheduler.schedule()  # (a request whose adapter failed to read waits)
            for request in out.dropped:
                outputs.append(self._finish(request, "abort", error=(
                    f"dropped: waited past the {self.config.slo_ttft_s}s first-token SLO")))
            self.copier.submit(self.adapters.take_pending(), after=fence)
            # The step waits for the copies of the adapters it reads (and is ordered after every
            # copy done so far, whose pages may have changed hands); prefetches run on.
            self.copier.wait({s.request.adapter for s in out.scheduled})
            if self.host_reads.has_failures:  # a read or a copy found an adapter file damaged
                outputs += self._fail_unreadable([*(s.request for s in out.scheduled),
                                                  *self.scheduler.waiting])
                out.scheduled = [s for s in out.scheduled if not s.request.finished]
            launched = self._launch(out.scheduled, outputs) if out.scheduled else None
            self._prefetch_adapters(fence)  # overlaps the step just launched (on CUDA)
            if self._in_flight is not None:
                outputs += self._read_tokens(self._in_flight)
            self._in_flight = launched
            return [o for o in outputs if o is not None]

    def _launch(self, scheduled: list[ScheduledRequest],
                outputs: list[RequestOutput | None]) -> StepInFlight | None:
        """Run the forward and sample on the device; the tokens are read by the next step."""
        residents = {r.adapter: self.adapters.get(r.adapter)
                     for r in (s.request for s in scheduled) if r.adapter is not None}
        pending = self._in_flight.pending() if self._in_flight is not None else None
        sampling = [s.request for s in scheduled if s.samples]
        try:
            logits = self.runner.execute(scheduled, residents, pending)
            tokens = self.sampler.sample_on_device(
                logits, [r.request_id for r in sampling], [r.params for r in sampling])
        except Exception as e:  # a failed step must not strand requests or pages
            if self.device.type == "cuda":
                # (what it launched may still write the pages freed below, and no event of
                # this step will fence the copies into them)
                torch.cuda.synchronize(self.device)
            for s in scheduled:
                outputs.append(self._finish(s.request, "error", error=f"engine step failed: {e}"))
            return None
        self.steps += 1
        for s in scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
        return StepInFlight(sampling, tokens)

    def _read_tokens(self, step: StepInFlight) -> list[RequestOutput | None]:
        """Append a launched step's tokens (waiting for the GPU to finish it); a request that
        ended meanwhile (stop, abort, error) drops its row: that row was speculative."""
        tokens = step.read()
        now = time.monotonic()
        return [self._append_token(r, slot, token, now)
                for r, slot, token in zip(step.requests, step.slots, tokens) if not r.finished]

    def _prefetch_adapters(self, fence: torch.cuda.Event | None) -> None:
        """Copy adapters of the next queued requests into free pages on the side stream."""
        if not self.config.prefetch_adapters:
            return
        keep_free = len(self.scheduler.running) + 1  # one more KV page per running request
        for request in itertools.islice(self.scheduler.waiting, self.config.max_num_seqs):
            name = request.adapter
            if name is None or name in self.adapters or not self.store.has_weights(name):
                continue
            if not self.adapters.prefetch(name, keep_free):
                break
        self.copier.submit(self.adapters.take_pending(), after=fence)  # a failure: next step's work

    def _drain_inbox(self) -> list[RequestOutput]:
        with self._wakeup:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        outputs = []
        for request in inbox:
            if request.adapter is not None:
                if request.adapter not in self.store:  # unloaded between validation and now
                    outputs.append(self._finish(request, "error", error=(
                        f"adapter {request.adapter!r} was unloaded before the request started")))
                    continue
                self.store.get(request.adapter).total_requests += 1
                self._adapter_ready(request.adapter)  # starts reading it from disk now
            self.scheduler.add(request)
        for request_id in aborts:
            stream = self._streams.get(request_id)
            if stream is not None:
                outputs.append(self._finish(stream.request, "abort"))
        return outputs

    def _fail_unreadable(self, requests: Iterable[Request]) -> list[RequestOutput]:
        """End ``requests`` that use an adapter whose file could not be read, with the reason,
        and drop the adapter from the pool (its pages hold nothing valid)."""
        failed = self.host_reads.take_failures()
        if not failed:
            return []
        outputs = [self._finish(r, "error", error=failed[r.adapter])
                   for r in list(requests) if r.adapter in failed]
        self.copier.wait(failed)  # a failed copy reports before its future ends
        for name in failed:
            if name in self.adapters and not self.adapters.get(name).pins:
                self.adapters.evict(name)
        return outputs

    def _idle_while_reading(self) -> None:
        """Nothing runs and the queue waits for adapter reads: pause instead of spinning (the
        reader threads need the GIL too)."""
        if not self.scheduler.running and self.host_reads.busy:
            time.sleep(1e-3)

    def _adapter_ready(self, name: str) -> bool:
        """Admit a request for ``name`` only once its adapter is on the GPU or in host memory."""
        return name in self.adapters or self.host_reads.ready(name)

    def _append_token(self, request: Request, slot: int, token: int,
                      now: float) -> RequestOutput | None:
        """``token`` read for the placeholder at ``output_token_ids[slot]``."""
        if request.first_token_time is None:
            request.first_token_time = now
        params = request.params
        if token in self.eos_ids and not params.ignore_eos:
            return self._finish(request, "stop")  # (drops the placeholder)
        request.output_token_ids[slot] = token
        request.num_pending_tokens -= 1
        self.generated_tokens += 1
        if self._streams[request.request_id].add_token(token):
            return self._finish(request, "stop", delta_tokens=[token])
        if slot + 1 >= params.max_tokens:
            return self._finish(request, "length", delta_tokens=[token])
        return self._emit(request, [token])

    def _finish(
        self, request: Request, reason: str, delta_tokens: list[int] | None = None,
        error: str | None = None,
    ) -> RequestOutput:
        self.scheduler.finish(request, reason)
        self.sampler.forget(request.request_id)
        self.finished_requests += 1
        # tokens still being sampled for it will not be read: their placeholders go
        del request.output_token_ids[len(request.output_token_ids) - request.num_pending_tokens:]
        request.num_pending_tokens = 0
        out = self._emit(request, delta_tokens or [], error)
        with self._inbox_lock:
            del self._streams[request.request_id]
        return out

    def _emit(self, request: Request, delta_tokens: list[int], error: str | None = None) -> RequestOutput:
        stream = self._streams[request.request_id]
        out = stream.emit(delta_tokens, error)
        if stream.broken and not out.finished:
            with self._inbox_lock:
                self._aborts.append(request.request_id)
        return out

    # ---- introspection ------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        graphs = self.runner.graphs
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self._inbox),
            pool_pages_total=self.pool.num_pages,
            pool_pages_free=self.pool.num_free,
            pool_pages_kv=self.pool.used_by[KV],
            pool_pages_adapter=self.adapters.pool.used_by[ADAPTER],
            adapter_partition_pages=0 if self.scheduler.unified else self.adapters.pool.num_pages,
            adapters_registered=len(self.store),
            adapters_gpu=len(self.adapters),
            adapters_host=self.store.num_in_host,
            adapter_loads=self.adapters.loads,
            adapter_evictions=self.adapters.evictions,
            adapter_hits=self.adapters.hits,
            adapter_misses=self.adapters.misses,
            adapter_prefetches=self.adapters.prefetches,
            generated_tokens=self.generated_tokens,
            finished_requests=self.finished_requests,
            preemptions=self.scheduler.num_preemptions,
            steps=self.steps,
            decode_graphs=graphs.num_graphs if graphs else 0,
            graph_steps=graphs.replays if graphs else 0,
        )
