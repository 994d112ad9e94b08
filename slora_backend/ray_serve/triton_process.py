"""One tritonserver of this model repository, owned by one Ray Serve replica, and the HTTP calls
the replica makes to it.

The server is started through the project's launcher CLI (``python -m slora_backend.serve``) on
ports of its own; the launcher dies with the replica (Linux parent-death signal), and stops its
tritonserver when it does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from ..launcher.server import die_with_parent, free_ports

ADAPTERS_MODEL = "slora_adapters"
GENERATE_MODEL = "slora"


class ReplicaUnavailable(RuntimeError):
    """The replica's tritonserver cannot be reached (it exited or stopped answering)."""


class AdapterActionError(RuntimeError):
    """``slora_adapters`` refused an action; ``status`` and ``message`` are Triton's answer
    (the message starts with the error code, e.g. ``NOT_FOUND: adapter 'x' ...``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class LaunchOptions:
    """What each replica's launcher is given (``slora-serve`` flags beyond the ports)."""

    base_model: str = "smollm2"
    adapter_root: str | None = None
    launcher_args: tuple[str, ...] = ()  # e.g. ("--device", "cuda", "--dtype", "bfloat16")
    ready_timeout_s: float = 600.0
    log_dir: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)


class TritonProcess:
    """A tritonserver started by the launcher CLI, with its URLs."""

    def __init__(self, options: LaunchOptions, name: str) -> None:
        self.options = options
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        args = [sys.executable, "-m", "slora_backend.serve", "--base-model", options.base_model,
                "--host", "127.0.0.1", "--http-port", str(self.http_port),
                "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
                *options.launcher_args]
        if options.adapter_root:
            args += ["--adapter-root", options.adapter_root]
        log_dir = Path(options.log_dir) if options.log_dir else None
        self.log_path = log_dir / f"{name}.log" if log_dir else None
        if log_dir:
            log_dir.mkdir(parents=True, exist_ok=True)
            args += ["--log-file", str(self.log_path)]

        env = {**os.environ, **options.extra_env}
        self.process = subprocess.Popen(args, env=env, preexec_fn=die_with_parent,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.options.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ReplicaUnavailable(f"the launcher exited with code {self.process.returncode} "
                                         f"before tritonserver was ready (log: {self.log_path})")
            if self.ready():
                return
            time.sleep(0.5)
        self.stop()
        raise ReplicaUnavailable(f"tritonserver not ready after {self.options.ready_timeout_s} s "
                                 f"(log: {self.log_path})")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def alive(self) -> bool:
        return self.process.poll() is None and self.ready()

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # the launcher stops its tritonserver
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class TritonHttp:
    """The replica's async calls to its tritonserver; connection failures become
    ``ReplicaUnavailable`` (a request the ingress may retry on another replica)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def adapter_action(self, action: str, lora_name: str = "") -> dict:
        def tensor(name: str, value: str) -> dict:
            return {"name": name, "shape": [1], "datatype": "BYTES", "data": [value]}

        body = {"inputs": [tensor("action", action), tensor("lora_name", lora_name)]}
        status, text = await self._post(f"/v2/models/{ADAPTERS_MODEL}/infer", body)
        if status != 200:
            raise AdapterActionError(status, json.loads(text).get("error", text))
        return json.loads(json.loads(text)["outputs"][0]["data"][0])

    async def generate(self, body: dict) -> tuple[int, str]:
        return await self._post(f"/v2/models/{GENERATE_MODEL}/generate", body)

    async def generate_stream(self, body: dict) -> AsyncIterator[bytes]:
        """Triton's server-sent events, one ``data: ...`` line (with its blank line) each."""
        url = f"{self.base_url}/v2/models/{GENERATE_MODEL}/generate_stream"
        try:
            async with self.session().post(url, json=body) as response:
                async for line in response.content:
                    if line.strip():
                        yield line.rstrip(b"\r\n") + b"\n\n"
        except aiohttp.ClientError as e:
            raise ReplicaUnavailable(f"tritonserver at {self.base_url} failed mid-stream: {e}") from e

    async def _post(self, path: str, body: dict) -> tuple[int, str]:
        try:
            async with self.session().post(f"{self.base_url}{path}", json=body) as response:
                return response.status, await response.text()
        except aiohttp.ClientError as e:
            raise ReplicaUnavailable(f"tritonserver at {self.base_url} unreachable: {e}") from e

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
