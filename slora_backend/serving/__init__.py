"""The serving layer between Triton's Python backend and the engine.

The models in ``model_repository/`` hand this package numpy arrays and small sink objects and
get typed results back. ``triton_python_backend_utils`` is imported only by the models'
``model.py`` and ``triton_stub``, which only they import.

- ``engine_json``: the model repository's ``slora_engine/1/engine.json``; ``settings``: that file
  -> ``EngineConfig`` and the serving settings, validated key by key.
- ``inputs``: input tensors -> ``GenerateRequest`` (prompt, ``SamplingParams``, adapter, mode).
- ``engine_process``: ``EngineProcess``, the engine in a child process of its own (the stub's
  threads then never compete with the engine loop for a GIL); ``supervisor``:
  ``EngineSupervisor``, which restarts that process a bounded number of times when it dies.
- ``router``: ``StreamRouter``, the in-flight requests of one engine model. ``execute()`` only
  queues; an intake thread adds requests to the engine, the engine thread only queues outputs,
  and a response thread sends them, polls cancellation and aborts cancelled requests.
- ``control``: adapter management and introspection actions run in the engine's process,
  ``AdapterNames``, the ensemble's per-request adapter check run in the adapter model's, and
  ``AdminToken``, the check that guards the management actions.
- ``control_channel``: the UNIX socket that carries those actions from ``slora_adapters``.
- ``vllm_format``: the vLLM backend's ``sampling_parameters`` (Triton's OpenAI frontend,
  genai-perf) read onto this server's inputs; ``lora_manifest``: ``model.json`` and
  ``multi_lora.json``, where that frontend learns which adapters it may pass on.
- ``metrics``: engine statistics -> gauges and counters.
- ``gateway_metrics``: the metric names a Kubernetes inference gateway routes by, and the LoRA
  info gauge (adapters of running and waiting requests).
- ``errors``: ``ServingError`` with its Triton error code.
- ``triton_stub``: the helpers both ``model.py`` files share (inputs, errors, settings file).

Names are imported on first use: the adapter model's stub imports only torch-free modules.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_EXPORTS = {
    "ADAPTER_ACTIONS": ".control", "AdapterNames": ".control", "AdminToken": ".control",
    "ControlHandler": ".control", "ControlRequest": ".control",
    "parse_adapter_action": ".control",
    "EngineProcess": ".engine_process", "EngineProcessError": ".errors",
    "EngineSupervisor": ".supervisor",
    "GATEWAY_METRIC_FLAGS": ".gateway_metrics", "LORA_INFO_DESCRIPTION": ".gateway_metrics",
    "LORA_INFO_METRIC": ".gateway_metrics", "LoraInfoGauge": ".gateway_metrics",
    "ServingError": ".errors", "error_from_exception": ".errors",
    "GenerateRequest": ".inputs", "parse_generate": ".inputs",
    "HIT_RATIO": ".metrics", "METRICS": ".metrics", "TTFT_BUCKETS": ".metrics",
    "TTFT_NAME": ".metrics", "FIRST_RESPONSE_DELAY_NAME": ".metrics",
    "FIRST_RESPONSE_DELAY_BUCKETS": ".metrics", "MetricsPublisher": ".metrics",
    "ResponsePayload": ".router", "StreamRouter": ".router",
    "ServingSettings": ".settings", "settings_from_json": ".settings",
    "LoraManifest": ".lora_manifest", "SamplingParameters": ".vllm_format",
}
_SUBMODULES = ("control", "control_channel", "engine_json", "engine_process", "errors",
               "gateway_metrics", "inputs", "lora_manifest", "metrics", "router", "settings",
               "supervisor", "triton_stub", "vllm_format")

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS, _SUBMODULES)
