"""slora_adapters: adapter management while serving, and the `slora` ensemble's adapter step.

Each request names an ``action``. Without one it is the ``slora`` ensemble's adapter step: the
name is checked here against the adapter root (``serving.AdapterNames``), with no call to the
engine, so this step costs microseconds per request; only a name not found there is asked of
the engine (so an ``adapter_root`` parameter that differs from the engine's cannot refuse a
name the engine knows). Every explicit action (``list``, ``load``,
``unload``, ``describe``, ``resolve``, ...) travels to the engine's process, where the adapters
live, over its control socket (``serving.control_channel``; not BLS, which crashed this model's
stub under load); the engine's answer (JSON) or its error (with its code) comes back as this
model's response.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _parameters(model_config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def _getter(request):
    def get(name: str):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    return get


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = _parameters(config)
        for root in reversed([p for p in params.get("python_path", "").split(os.pathsep) if p]):
            if root not in sys.path:
                sys.path.insert(0, root)
        from slora_backend import serving

        self.serving = serving
        # Relative paths are resolved as slora_engine resolves them: from the repository's parent.
        base_dir = Path(args["model_repository"]).resolve().parent.parent
        root = serving.settings.adapter_root_parameter(params, base_dir)
        self.names = serving.AdapterNames(root) if root is not None else None
        repository_root = Path(args["model_repository"]).resolve().parent
        self.channel = serving.control_channel.channel_path(repository_root)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                get = _getter(request)
                control = self.serving.parse_adapter_action(get)
                ensemble_step = get("action") is None
                if control.action == "resolve" and not control.lora_name:
                    result = {"name": None, "base_model": True}  # nothing to ask the engine
                elif ensemble_step and self.names is not None:
                    try:
                        result = self.names.check(control.lora_name)
                    except self.serving.ServingError:  # not found here: the engine decides
                        result = self._ask_engine(control)
                else:
                    result = self._ask_engine(control)
                payload = np.array([json.dumps(result, sort_keys=True).encode()], dtype=np.object_)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("result", payload)]))
            except Exception as e:  # a ServingError keeps its code; anything else is mapped
                e = self.serving.error_from_exception(e)
                code = getattr(pb_utils.TritonError, e.code, pb_utils.TritonError.INTERNAL)
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(e.wire_message(), code)))
        return responses

    def _ask_engine(self, control) -> dict:
        return self.serving.control_channel.ask(self.channel, control)
