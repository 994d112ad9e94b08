"""The serving layer between Triton's Python backend and the engine, with no Triton import.

The models in ``model_repository/`` hand this package numpy arrays and small sink objects and
get typed results back; ``triton_python_backend_utils`` stays in the models' ``model.py``.

- ``inputs``: input tensors -> ``GenerateRequest`` (prompt, ``SamplingParams``, adapter, mode).
- ``engine_process``: ``EngineProcess``, the engine in a child process of its own (the stub's
  threads then never compete with the engine loop for a GIL).
- ``router``: ``StreamRouter``, the in-flight requests of one engine model. ``execute()`` only
  queues; an intake thread adds requests to the engine, the engine thread only queues outputs,
  and a response thread sends them, polls cancellation and aborts cancelled requests.
- ``control``: adapter management and introspection actions run in the engine's process, and
  ``AdapterNames``, the ensemble's per-request adapter check run in the adapter model's.
- ``control_channel``: the UNIX socket that carries those actions from ``slora_adapters``.
- ``metrics``: engine statistics -> gauges and counters.
- ``gateway_metrics``: the metric names a Kubernetes inference gateway routes by, and the LoRA
  info gauge (adapters of running and waiting requests).
- ``settings``: ``config.pbtxt`` parameters -> ``EngineConfig``.
- ``errors``: ``ServingError`` with its Triton error code.
"""

from . import control_channel, gateway_metrics
from .control import (
    ADAPTER_ACTIONS,
    AdapterNames,
    ControlHandler,
    ControlRequest,
    parse_adapter_action,
)
from .engine_process import EngineProcess, EngineProcessError
from .errors import ServingError, error_from_exception
from .gateway_metrics import GATEWAY_METRIC_FLAGS, LORA_INFO_DESCRIPTION, LORA_INFO_METRIC, LoraInfoGauge
from .inputs import GenerateRequest, parse_generate
from .metrics import HIT_RATIO, METRICS, TTFT_BUCKETS, TTFT_NAME, MetricsPublisher
from .router import ResponsePayload, StreamRouter
from .settings import ServingSettings, settings_from_parameters

__all__ = [
    "ADAPTER_ACTIONS", "AdapterNames", "ControlHandler", "ControlRequest", "EngineProcess",
    "EngineProcessError", "GATEWAY_METRIC_FLAGS", "GenerateRequest", "LORA_INFO_DESCRIPTION",
    "LORA_INFO_METRIC", "LoraInfoGauge",
    "HIT_RATIO", "METRICS", "MetricsPublisher", "ResponsePayload", "ServingError",
    "ServingSettings", "StreamRouter", "TTFT_BUCKETS", "TTFT_NAME", "control_channel", "gateway_metrics",
    "error_from_exception", "parse_adapter_action", "parse_generate", "settings_from_parameters",
]
