"""The control channel between ``slora_adapters`` and the engine's process: a UNIX socket.

Adapter management (``list``, ``load``, ``unload``, ``describe``, ``resolve``, ``stats``,
``abort``) runs where the engine lives, in ``slora_engine``'s stub process. It used to travel
there as a BLS request into the decoupled engine model; on the H200 under load the
``slora_adapters`` stubs then segfaulted inside the Python backend's BLS path (Triton 2.51, see
docs/serving.md), and a dead ``slora_adapters`` takes the ``slora`` ensemble down with it. A
local socket keeps Triton's C++ out of this path: one JSON line asks, one JSON line answers.

The socket lives in the temp directory under a name derived from the model repository's path
(both models know it), is readable and writable by its owner only, and is removed at shutdown.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import socketserver
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .control import ControlRequest
from .errors import INTERNAL, UNAVAILABLE, ServingError, error_from_exception

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 1 << 20


def channel_path(repository: str | os.PathLike[str]) -> str:
    """The socket of the engine serving the model repository at ``repository``."""
    digest = hashlib.sha1(str(Path(repository).resolve()).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"slora-control-{digest}.sock")


class ControlServer:
    """Answers control requests on a UNIX socket, one thread per connection."""

    def __init__(self, path: str, handle: Callable[[ControlRequest], dict[str, Any]]) -> None:
        self.path = path
        if os.path.exists(path):  # left by a server that did not shut down
            os.unlink(path)

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(MAX_MESSAGE_BYTES)
                try:
                    answer = {"result": handle(ControlRequest.from_json(line.decode()))}
                except Exception as e:  # every failure becomes an answer with its code
                    err = error_from_exception(e)
                    answer = {"error": {"code": err.code, "message": err.message}}
                self.wfile.write(json.dumps(answer, sort_keys=True).encode() + b"\n")

        old_umask = os.umask(0o177)  # the socket is created owner-only
        try:
            self._server = socketserver.ThreadingUnixStreamServer(path, Handler)
        finally:
            os.umask(old_umask)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="slora-control",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def ask(path: str, request: ControlRequest, timeout_s: float = 120.0) -> dict[str, Any]:
    """Send ``request`` to the engine at ``path``; its result, or its error as ServingError."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(path)
            sock.sendall(request.to_json().encode() + b"\n")
            line = sock.makefile("rb").readline(MAX_MESSAGE_BYTES)
    except (FileNotFoundError, ConnectionRefusedError):
        raise ServingError(UNAVAILABLE, "the engine (slora_engine) is not running") from None
    except OSError as e:
        raise ServingError(UNAVAILABLE, f"the engine (slora_engine) did not answer: {e}") from None
    try:
        answer = json.loads(line)
    except json.JSONDecodeError:
        raise ServingError(INTERNAL, "the engine sent an unreadable answer") from None
    if "error" in answer:
        raise ServingError(answer["error"]["code"], answer["error"]["message"])
    return answer["result"]
