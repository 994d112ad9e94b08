"""Ray Serve deployments: replicas that each own one tritonserver, with the adapter name as Ray
Serve's multiplexed model id, behind an ingress that speaks Triton's generate JSON.

Routing: a request's ``lora_name`` becomes its multiplexed model id, so Ray Serve sends it to a
replica that has loaded that adapter through ``SLoRAReplica.get_adapter`` (and, for a new one, to
the replica holding the fewest), unloading the least recently used past
``max_adapters_per_replica``. The base model (no ``lora_name``) goes to any replica.

Replica death: a request whose replica dies (its actor, or its tritonserver: then the replica
raises ``ReplicaUnavailable`` and Ray's health check replaces it) is sent again to another replica,
up to ``max_attempts`` times, while nothing of its answer has gone out. A stream that already sent
text ends with an error event instead: ``data: {"error": "UNAVAILABLE: replica died after ..."}``.
Every request therefore ends with its answer or an error naming the replica's death.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .triton_process import (
    AdapterActionError,
    LaunchOptions,
    ReplicaUnavailable,
    TritonHttp,
    TritonProcess,
)

GENERATE_PATH = "/v2/models/slora/generate"
STREAM_PATH = "/v2/models/slora/generate_stream"
REPLICA_DIED = (RayActorError, ActorUnavailableError, ReplicaUnavailable)


@dataclass(frozen=True)
class RayServeOptions:
    num_replicas: int = 2
    max_adapters_per_replica: int = 64  # Ray Serve's LRU bound on adapters per replica
    max_attempts: int = 3  # tries of one request on different replicas when replicas die
    replica_num_cpus: float = 1.0
    replica_num_gpus: float = 0.0  # 1.0: one GPU per replica (its tritonserver runs on it)
    state_dir: str | None = None  # each replica writes <replica>.json (URLs, pid) here
    # False: requests go to any replica (no multiplexed model id); for measuring what affinity buys.
    affinity: bool = True
    launch: LaunchOptions = LaunchOptions()

    def __post_init__(self) -> None:
        for name in ("num_replicas", "max_adapters_per_replica", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class LoadedAdapter:
    """What the multiplexed loader returns: the adapter as registered in this replica's engine."""

    def __init__(self, name: str, info: dict) -> None:
        self.name, self.info = name, info


def replica_class(options: RayServeOptions) -> type:
    """The replica class with its multiplexed loader bound to ``max_adapters_per_replica``."""

    class SLoRAReplica:
        def __init__(self) -> None:
            context = serve.get_replica_context()
            self.replica_id = context.replica_id.unique_id
            self.triton = TritonProcess(options.launch, f"replica-{self.replica_id}")
            self.triton.wait_ready()
            self.http = TritonHttp(self.triton.http_url)
            self.adapter_loads = 0  # multiplexed loads on this replica (the router's view)
            if options.state_dir:
                import ray

                os.makedirs(options.state_dir, exist_ok=True)
                state = {"replica_id": self.replica_id, "http_url": self.triton.http_url,
                         "metrics_url": self.triton.metrics_url, "pid": os.getpid(),
                         "actor_name": ray.get_runtime_context().get_actor_name()}
                with open(os.path.join(options.state_dir, f"{self.replica_id}.json"), "w") as f:
                    json.dump(state, f)

        @serve.multiplexed(max_num_models_per_replica=options.max_adapters_per_replica)
        async def get_adapter(self, lora_name: str) -> LoadedAdapter:
            """Register the adapter in this replica's engine (``slora_adapters`` ``resolve``)."""
            info = await self.http.adapter_action("resolve", lora_name)
            self.adapter_loads += 1
            return LoadedAdapter(lora_name, info)

        async def _adapter(self) -> None:
            lora_name = serve.get_multiplexed_model_id()
            if lora_name:
                await self.get_adapter(lora_name)

        async def generate(self, body: dict) -> tuple[int, str]:
            """Triton's status and JSON body (an adapter the engine refuses: Triton's error)."""
            try:
                await self._adapter()
            except AdapterActionError as e:
                return e.status, json.dumps({"error": e.message})
            return await self.http.generate(body)

        async def generate_stream(self, body: dict):
            try:
                await self._adapter()
            except AdapterActionError as e:
                yield f"data: {json.dumps({'error': e.message})}\n\n".encode()
                return
            async for event in self.http.generate_stream(body):
                yield event

        async def stats(self) -> dict:
            return {"replica_id": self.replica_id, "adapter_loads": self.adapter_loads,
                    **await self.http.adapter_action("stats")}

        def check_health(self) -> None:
            if not self.triton.alive():
                raise ReplicaUnavailable(f"tritonserver of replica {self.replica_id} is down")

        def __del__(self) -> None:
            triton = getattr(self, "triton", None)
            if triton is not None:
                triton.stop()

    return SLoRAReplica


class SLoRAIngress:
    """HTTP ingress with Triton's generate endpoints (``POST /v2/models/slora/generate`` and
    ``.../generate_stream``, the same JSON: ``text_input``, ``max_tokens``, ``lora_name``, ...)."""

    def __init__(self, replicas, max_attempts: int, affinity: bool = True) -> None:
        self.replicas = replicas
        self.max_attempts = max_attempts
        self.affinity = affinity

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if request.method != "POST" or path not in (GENERATE_PATH, STREAM_PATH):
            return JSONResponse({"error": f"NOT_FOUND: no endpoint {request.method} {path}; use "
                                          f"POST {GENERATE_PATH} or {STREAM_PATH}"}, status_code=404)
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError(f"the body is a JSON {type(body).__name__}, not an object")
        except ValueError as e:
            return JSONResponse({"error": f"INVALID_ARG: {e}"}, status_code=400)
        lora_name = body.get("lora_name") or ""
        if not isinstance(lora_name, str):
            return JSONResponse({"error": f"INVALID_ARG: lora_name must be a string, got "
                                          f"{lora_name!r}"}, status_code=400)
        handle = self.replicas.options(multiplexed_model_id=lora_name if self.affinity else "")
        if path == STREAM_PATH:
            return StreamingResponse(self._stream(handle, body), media_type="text/event-stream")
        return await self._unary(handle, body)

    async def _unary(self, handle, body: dict) -> Response:
        last = None
        for _ in range(self.max_attempts):
            try:
                status, text = await handle.generate.remote(body)
                return Response(text, status_code=status, media_type="application/json")
            except REPLICA_DIED as e:
                last = e
        return JSONResponse({"error": _died(self.max_attempts, last, sent=0)}, status_code=503)

    async def _stream(self, handle, body: dict):
        last, sent = None, 0
        for _ in range(self.max_attempts):
            try:
                async for event in handle.options(stream=True).generate_stream.remote(body):
                    sent += 1
                    yield event
                return
            except REPLICA_DIED as e:
                last = e
                if sent:
                    break  # text went out already: the client cannot be given a second answer
        yield f"data: {json.dumps({'error': _died(self.max_attempts, last, sent)})}\n\n".encode()


def _died(attempts: int, error: BaseException | None, sent: int) -> str:
    where = f"after {sent} streamed events" if sent else f"on {attempts} attempt(s)"
    return f"UNAVAILABLE: replica died {where}: {type(error).__name__}: {error}"


def build_app(options: RayServeOptions):
    """The Ray Serve application: ``serve.run(build_app(options))``."""
    replica = serve.deployment(
        replica_class(options), name="SLoRAReplica", num_replicas=options.num_replicas,
        ray_actor_options={"num_cpus": options.replica_num_cpus,
                           "num_gpus": options.replica_num_gpus},
        max_ongoing_requests=1024, health_check_period_s=5, health_check_timeout_s=30,
        graceful_shutdown_timeout_s=30)
    ingress = serve.deployment(SLoRAIngress, name="SLoRAIngress", max_ongoing_requests=4096,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(), options.max_attempts, options.affinity)


