"""slora_adapters: adapter management while serving, and the `slora` ensemble's adapter step.

Each request names an ``action``. Without one it is the ``slora`` ensemble's adapter step: the
name is checked here against the adapter root (``serving.AdapterNames``), with no call to the
engine, so this step costs microseconds per request; only a name not found there is asked of
the engine (so an adapter root that differs from the engine's cannot refuse a name the engine
knows). Every explicit action (``list``, ``load``, ``unload``, ``describe``, ``resolve``, ...)
travels to the engine's process, where the adapters live, over its control socket
(``serving.control_channel``; not BLS, which crashed this model's stub under load); the
engine's answer (JSON) or its error (with its code) comes back as this model's response.
``load``, ``unload`` and ``abort`` need the admin token when the server has one
(``serving.AdminToken``).

The adapter root is read from the engine's ``engine.json``. This stub imports no torch.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from slora_backend.serving import control, control_channel, engine_json, triton_stub


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        data, base_dir = triton_stub.engine_settings(args)
        try:
            root = engine_json.adapter_root_setting(data, base_dir)
        except ValueError as e:
            raise pb_utils.TritonModelException(f"slora_adapters: {e}") from None
        self.names = control.AdapterNames(root) if root is not None else None
        self.admin = control.AdminToken.from_environment()
        self.channel = control_channel.channel_path(triton_stub.repository_root(args))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                get = triton_stub.input_getter(request)
                request_control = control.parse_adapter_action(get)
                self.admin.check(request_control.action, get)
                ensemble_step = get("action") is None
                if request_control.action == "resolve" and not request_control.lora_name:
                    result = {"name": None, "base_model": True}  # nothing to ask the engine
                elif ensemble_step and self.names is not None:
                    try:
                        result = self.names.check(request_control.lora_name)
                    except control.ServingError:  # not found here: the engine decides
                        result = self._ask_engine(request_control)
                else:
                    result = self._ask_engine(request_control)
                payload = np.array([json.dumps(result, sort_keys=True).encode()], dtype=np.object_)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("result", payload)]))
            except Exception as e:  # a ServingError keeps its code; anything else is mapped
                responses.append(triton_stub.error_response(e))
        return responses

    def _ask_engine(self, request_control) -> dict:
        return control_channel.ask(self.channel, request_control)
