"""Running tritonserver on a generated copy of the model repository.

``TritonServer.start()`` writes the copy (``repository.write_repository``), lays out the Python
backend with the stub for this Python (``triton_install``) and starts tritonserver in a process
group of its own; ``wait_ready()`` polls ``/v2/health/ready``; ``stop()`` ends the whole group
(the server, its backend stubs and the engine process) and waits until none of it runs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .options import ADMIN_TOKEN_ENV, ServeOptions
from .repository import write_repository
from .triton_install import TritonInstall, build_backend_dir, find_tritonserver, stub_environment


def die_with_parent() -> None:
    """``preexec_fn`` (Linux): the child gets SIGTERM when the thread that started it exits, so a
    launcher killed outright (SIGKILL, or a Ray replica's process torn down) leaves no server
    behind; the server runs in a session of its own, which no group signal of the parent's
    reaches. Start servers from a thread that lives as long as they should."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (the OS picks them)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


# ---- the server process ----------------------------------------------------------------------------


class ServerError(RuntimeError):
    pass


class TritonServer:
    """A tritonserver on a generated copy of the model repository."""

    def __init__(self, options: ServeOptions, log_file: str | Path | None = None,
                 install: TritonInstall | None = None) -> None:
        self.options = options
        self.log_file = Path(log_file) if log_file else None
        self.install = install
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.work_dir: Path | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.options.metrics_port}/metrics"

    @property
    def repository(self) -> Path:
        assert self.work_dir is not None
        return self.work_dir / "model_repository"

    def prepare(self) -> list[str]:
        """Write the repository and backend dir; returns the tritonserver command line."""
        o = self.options
        for name, port in (("--http-port", o.http_port), ("--grpc-port", o.grpc_port),
                           ("--metrics-port", o.metrics_port)):
            if not port_is_free(port):
                raise ServerError(f"{name} {port} is in use (another tritonserver?); pick another")
        self.install = self.install or find_tritonserver()
        if o.work_dir:
            self.work_dir = Path(o.work_dir).expanduser().resolve()
            self.work_dir.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="slora-serve-")
            self.work_dir = Path(self._tmp.name)
        write_repository(self.repository, o.engine_settings(), Path(o.source_repository))
        backends = build_backend_dir(self.install, self.work_dir / "backends")
        return [
            str(self.install.server),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--http-port={o.http_port}", f"--http-address={o.host}",
            f"--grpc-port={o.grpc_port}", f"--grpc-address={o.host}",
            f"--metrics-port={o.metrics_port}", f"--metrics-address={o.host}",
            f"--log-verbose={o.log_verbose}",
            *o.tritonserver_args,
        ]

    def start(self) -> TritonServer:
        command = self.prepare()
        env = stub_environment(self.install)
        # The adapter model reads the token from its environment, inherited from the server's:
        # it stays out of the repository and out of what Triton reports about the models.
        env.pop(ADMIN_TOKEN_ENV, None)
        if self.options.admin_token:
            env[ADMIN_TOKEN_ENV] = self.options.admin_token
        out = open(self.log_file, "ab") if self.log_file else None
        try:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT
                                            if out else None, start_new_session=True,
                                            preexec_fn=die_with_parent)
        finally:
            if out:
                out.close()
        return self

    def wait_ready(self, timeout: float = 600.0) -> None:
        assert self.process is not None, "start() first"
        url = f"http://{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"tritonserver exited with code {code} before it was ready"
                                  + self._log_hint())
            fatal = self._fatal_log_line()
            if fatal:
                raise ServerError(f"tritonserver cannot start a model: {fatal}" + self._log_hint())
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s" + self._log_hint())

    # Failures after which tritonserver keeps waiting instead of exiting.
    FATAL_LOG_PATTERNS = ("error while loading shared libraries", "is not healthy",
                          "Failed to initialize Python stub")

    def _fatal_log_line(self) -> str | None:
        if not (self.log_file and self.log_file.is_file()):
            return None
        for line in self.log_file.read_text(errors="replace").splitlines():
            if any(p in line for p in self.FATAL_LOG_PATTERNS):
                return line.strip()
        return None

    def _log_hint(self) -> str:
        if self.log_file and self.log_file.is_file():
            tail = self.log_file.read_text(errors="replace").splitlines()[-40:]
            return "\n--- server log (last lines) ---\n" + "\n".join(tail)
        return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server's process group (tritonserver unloads the models, which finalize),
        then SIGKILL whatever is left after ``timeout``, and wait until every process of the
        group has exited: the stubs and the engine process hold the GPU's memory until then,
        and a server or engine started right after would find it taken."""
        p = self.process
        code = None
        if p is not None:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            _signal_group(p.pid, signal.SIGKILL)  # stubs that outlived the server
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
            wait_group_exit(p.pid, 30.0)
            code = p.returncode
            self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return code

    def __enter__(self) -> TritonServer:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the group this launcher created with start_new_session
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running. Zombies do not count: they hold no
    memory, and one whose parent died waits on a reaper that a container may lack."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True  # no /proc to tell zombies apart: alive as far as we can tell
    for stat in proc.glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # the process exited while we looked
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def wait_group_exit(pgid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s until no process of group ``pgid`` runs; whether none does."""
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
