"""slora_engine: the S-LoRA engine as a decoupled Triton Python-backend model.

``execute()`` only converts each request into a typed ``GenerateRequest`` and queues it; the
engine runs in a child process of its own (``serving.EngineProcess``, restarted a bounded number
of times when it dies: ``serving.EngineSupervisor``; or on a thread of this process with
``engine_process: false``), and ``slora_backend.serving.StreamRouter`` sends every
response through the request's response sender from its own thread, polls ``is_cancelled()``
and aborts cancelled requests in the engine (their pages go back to the pool). Adapter management from
``slora_adapters`` arrives on a UNIX socket (``serving.control_channel``), answered on its own
threads, so adapter loads never stall the intake. ``finalize()`` answers what is in flight and
stops the engine.

Settings come from ``engine.json`` beside this file (``serving.engine_json``). All Triton types
stay in this file and ``serving.triton_stub``: the engine and the serving layer see numpy arrays, plain
values and the two small sink classes below.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from slora_backend import serving
from slora_backend.serving import triton_stub


class _SenderSink:
    """A ``ResponseSink`` over one request's response sender."""

    def __init__(self, sender) -> None:
        self.sender = sender

    def send(self, payload, error, final: bool) -> None:
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        if error is not None:
            response = triton_stub.error_response(error)
        else:
            response = pb_utils.InferenceResponse(output_tensors=[
                triton_stub.bytes_tensor("text_output", payload.text),
                triton_stub.bytes_tensor("finish_reason", payload.finish_reason),
                pb_utils.Tensor("num_input_tokens", np.array([payload.num_input_tokens], np.uint32)),
                # UINT32, as the vLLM backend's: the OpenAI frontend reads the counts only as such.
                pb_utils.Tensor("num_output_tokens",
                                np.array([payload.num_output_tokens], np.uint32)),
            ])
        self.sender.send(response, flags=flags)

    def is_cancelled(self) -> bool:
        return self.sender.is_cancelled()


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException(
                "slora_engine must be decoupled: set model_transaction_policy { decoupled: true }"
            )
        data, base_dir = triton_stub.engine_settings(args)
        try:
            settings = serving.settings_from_json(data, base_dir)
        except ValueError as e:
            raise pb_utils.TritonModelException(f"slora_engine: {e}") from None
        self.logger = pb_utils.Logger
        self.engine = self._start_engine(settings)
        repository_root = triton_stub.repository_root(args)
        self.max_tokens_limit = settings.max_tokens_limit or self.engine.max_model_len
        self.router = serving.StreamRouter(self.engine, on_first_token=self._observe_ttft,
                                           stream_interval=settings.stream_interval,
                                           on_first_response=self._observe_first_response)
        self._init_metrics(args, settings)
        self.control = serving.ControlHandler(
            self.engine, self.router, extra_stats=lambda: {
                "requests_cancelled": self.router.counters.cancelled,
                "request_errors": self.router.counters.errors,
                "max_model_len": self.engine.max_model_len,
                "max_tokens_limit": self.max_tokens_limit,
                **self._engine_health(),
            })
        root = settings.engine.adapter_root
        self._registry_file = Path(root) / serving.lora_manifest.REGISTRY_FILE if root else None
        self.manifest = self._start_manifest(repository_root)
        self.control_server = serving.control_channel.ControlServer(
            serving.control_channel.channel_path(repository_root), self._handle_control)
        cfg = settings.engine
        self.logger.log_info(
            f"slora_engine ready: base_model={cfg.base_model} device={cfg.device} "
            f"dtype={cfg.dtype} kernels={cfg.resolved_kernel_backend} "
            f"pool_pages={self.engine.stats().pool_pages_total} adapter_root={cfg.adapter_root} "
            f"max_model_len={self.engine.max_model_len} engine_process={settings.engine_process}"
        )

    def _start_engine(self, settings):
        if settings.engine_process:
            try:
                return serving.EngineSupervisor(settings.engine, settings.engine_restarts,
                                                on_event=self._log_engine_event)
            except serving.EngineProcessError as e:
                raise pb_utils.TritonModelException(f"slora_engine: {e}") from None
        from slora_backend import Engine

        engine = Engine(settings.engine)
        engine.start()
        return engine

    # ---- the adapter list Triton's OpenAI frontend reads -------------------------------------------

    def _start_manifest(self, repository_root):
        manifest = serving.LoraManifest.for_repository(repository_root)
        if manifest is None:
            self.logger.log_warn(f"no version directory of model '{serving.lora_manifest.PUBLIC_MODEL}'"
                                 f" in {repository_root}: no model.json / multi_lora.json written")
            return None
        try:
            manifest.enable()
        except OSError as e:  # a read-only repository: serving works, the frontend sees no adapters
            self.logger.log_warn(f"cannot write {manifest.version_dir}/model.json: {e}")
            return None
        self._sync_manifest(manifest)
        return manifest

    def _registered_adapters(self) -> dict:
        return {a.name: a.path for a in self.engine.list_adapters()}

    def _sync_manifest(self, manifest=None) -> None:
        manifest = manifest or self.manifest
        if manifest is None:
            return
        try:
            manifest.sync(self._registered_adapters())
        except Exception as e:  # the list must never take the model down
            self.logger.log_warn(f"multi_lora.json update failed: {e}")

    def _handle_control(self, request) -> dict:
        try:
            return self.control.handle(request)
        finally:
            if request.action in ("load", "unload", "resolve"):  # resolve may register on first use
                self._sync_manifest()

    def _log_engine_event(self, message: str) -> None:
        pb_utils.Logger.log_error(message)

    def _engine_health(self) -> dict:
        """The engine process's pid and restarts, for ``stats`` (none when it runs in-process)."""
        if not isinstance(self.engine, serving.EngineSupervisor):
            return {"engine_pid": None, "engine_restarts": 0}
        return {"engine_pid": self.engine.pid, "engine_restarts": self.engine.restarts}

    # ---- metrics --------------------------------------------------------------------------------

    def _init_metrics(self, args: dict, settings) -> None:
        labels = {"model": args["model_name"], "version": args["model_version"]}
        kinds = {"gauge": pb_utils.MetricFamily.GAUGE, "counter": pb_utils.MetricFamily.COUNTER}
        # Families stay referenced on self: once a family is collected, its metrics stop working.
        self._families: dict[str, pb_utils.MetricFamily] = {}
        metrics = {}
        for spec in (*serving.METRICS, serving.HIT_RATIO):
            family = self._families.get(spec.name)
            if family is None:
                family = pb_utils.MetricFamily(name=spec.name, description=spec.description,
                                               kind=kinds[spec.kind])
                self._families[spec.name] = family
            metrics[spec] = family.Metric(labels={**labels, **dict(spec.labels)})
        hit_ratio = metrics.pop(serving.HIT_RATIO)
        self.metrics = serving.MetricsPublisher(metrics, hit_ratio)
        ttft = pb_utils.MetricFamily(
            name=serving.TTFT_NAME,
            description="Seconds from the engine model receiving a request to its first token",
            kind=pb_utils.MetricFamily.HISTOGRAM,
        )
        self._families[serving.TTFT_NAME] = ttft
        self._ttft = ttft.Metric(labels=labels, buckets=list(serving.TTFT_BUCKETS))
        delay = pb_utils.MetricFamily(
            name=serving.FIRST_RESPONSE_DELAY_NAME,
            description="Seconds from a streaming request's first token reaching the engine model "
                        "to its first response being handed to Triton",
            kind=pb_utils.MetricFamily.HISTOGRAM,
        )
        self._families[serving.FIRST_RESPONSE_DELAY_NAME] = delay
        self._first_response_delay = delay.Metric(
            labels=labels, buckets=list(serving.FIRST_RESPONSE_DELAY_BUCKETS))
        lora_info = pb_utils.MetricFamily(name=serving.LORA_INFO_METRIC,
                                          description=serving.LORA_INFO_DESCRIPTION,
                                          kind=pb_utils.MetricFamily.GAUGE)
        self._families[serving.LORA_INFO_METRIC] = lora_info
        cfg = settings.engine
        self.lora_info = serving.LoraInfoGauge(
            lambda series_labels: lora_info.Metric(labels=series_labels),
            serving.gateway_metrics.max_lora(cfg.max_adapters_per_batch, cfg.max_num_seqs), labels)
        self._metrics_stop = threading.Event()
        self._metrics_thread = threading.Thread(
            target=self._metrics_loop, args=(settings.metrics_interval_s,), name="slora-metrics",
            daemon=True)
        self._metrics_thread.start()

    def _metrics_loop(self, interval_s: float) -> None:
        while not self._metrics_stop.wait(interval_s):
            try:
                self.metrics.update(self.engine.stats().to_dict())
                self.lora_info.update(self.router.adapter_activity(), time.time())
                if self.manifest is not None:  # adapters registered on first use
                    self.manifest.refresh(self._registry_file, self._registered_adapters)
            except Exception as e:  # metrics must never take the model down
                self.logger.log_warn(f"slora_engine metrics update failed: {e}")

    def _observe_ttft(self, seconds: float, lora_name) -> None:
        self._ttft.observe(seconds)

    def _observe_first_response(self, seconds: float, lora_name) -> None:
        self._first_response_delay.observe(seconds)

    # ---- requests -------------------------------------------------------------------------------

    def execute(self, requests):
        for request in requests:
            arrival = time.monotonic()
            sink = _SenderSink(request.get_response_sender())
            get = triton_stub.input_getter(request)
            try:
                generate = serving.parse_generate(get, self.max_tokens_limit)
                self.router.submit(generate, request.request_id(), sink, arrival)
            except serving.ServingError as e:
                sink.send(None, e, final=True)
            except Exception as e:
                sink.send(None, serving.error_from_exception(e), final=True)
        return None

    def finalize(self) -> None:
        self._metrics_stop.set()
        self.control_server.close()
        self.router.stop()
        if isinstance(self.engine, serving.EngineSupervisor):
            self.engine.stop()
        else:  # (the engine on a thread of this process: its memory and workers go too)
            self.engine.close()
        self._metrics_thread.join(timeout=5)
        self.logger.log_info("slora_engine stopped")
