"""The control channel between ``slora_adapters`` and the engine's process: a UNIX socket.

Adapter management (``list``, ``load``, ``unload``, ``describe``, ``resolve``, ``stats``,
``abort``) runs where the engine lives, in ``slora_engine``'s stub process, reached over a local
socket rather than BLS: Triton 2.51's Python-backend BLS path crashes the ``slora_adapters`` stub
under load (docs/serving.md), and a dead ``slora_adapters`` takes the ``slora`` ensemble down with
it. One JSON line asks, one JSON line answers.

The socket lives in a directory of the temp directory that only its owner can enter, under a
name derived from the model repository's path (both models know it), and is removed at shutdown.
"""

from __future__ import annotations

import hashlib
import json
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

MAX_MESSAGE_BYTES = 1 << 20


def channel_path(repository: str | os.PathLike[str]) -> str:
    """The socket of the engine serving the model repository at ``repository``."""
    digest = hashlib.sha1(str(Path(repository).resolve()).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"slora-control-{os.getuid()}", f"{digest}.sock")


def _private_dir(path: str) -> None:
    """Create the socket's directory owner-only; refuse one that someone else could enter."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{directory} must belong to this user with mode 0700")


class ControlServer:
    """Answers control requests on a UNIX socket, one thread per connection."""

    def __init__(self, path: str, handle: Callable[[ControlRequest], dict[str, Any]]) -> None:
        self.path = path
        _private_dir(path)
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

        self._server = socketserver.ThreadingUnixStreamServer(path, Handler)
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
