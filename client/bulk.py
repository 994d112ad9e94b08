"""Adapter loads that take a while: a progress line while one runs, and a whole directory at once.

The server reads adapters from under its adapter root, so a directory load needs a local view of
that root (the client runs where the root is mounted): every immediate subdirectory of
``<adapter_root>/<subdir>`` that holds an ``adapter_config.json`` is loaded under its own name,
with the path ``<subdir>/<name>`` as the server will resolve it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

from .errors import SLoRAClientError

T = TypeVar("T")
CONFIG_FILE = "adapter_config.json"


def with_progress(label: str, call: Callable[[], T], out: TextIO, interval_s: float = 0.5) -> T:
    """Run ``call``; on a terminal, rewrite ``label  <seconds>s`` on one line while it runs."""
    if not out.isatty():
        return call()
    done = threading.Event()
    start = time.monotonic()

    def tick() -> None:
        while not done.wait(interval_s):
            out.write(f"\r{label}  {time.monotonic() - start:.0f}s")
            out.flush()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        return call()
    finally:
        done.set()
        ticker.join()
        out.write("\r" + " " * (len(label) + 8) + "\r")
        out.flush()


def adapter_dirs(adapter_root: Path, subdir: str) -> list[str]:
    """Names of the adapter directories directly under ``adapter_root / subdir``, sorted."""
    base = adapter_root / subdir
    if not base.is_dir():
        raise SLoRAClientError("INVALID_ARG", f"{base} is not a directory (the adapter root is "
                                              f"{adapter_root}; set it with --adapter-root)")
    return sorted(p.name for p in base.iterdir() if (p / CONFIG_FILE).is_file())


def load_directory(load: Callable[[str, str], dict[str, Any]], adapter_root: Path, subdir: str,
                   out: TextIO) -> list[dict[str, Any]]:
    """Load every adapter directory under ``subdir``; one line per adapter on ``out`` as it goes
    (``[i/n] name: ...``). A failure is reported and the rest still load; returns one result per
    adapter: ``{"name", "path", "ok", "seconds"}`` plus the description or the error."""
    names = adapter_dirs(adapter_root, subdir)
    results = []
    for i, name in enumerate(names, 1):
        path = name if subdir in ("", ".") else f"{subdir.rstrip('/')}/{name}"
        label = f"[{i}/{len(names)}] {name}"
        start = time.monotonic()
        try:
            info = with_progress(label, lambda n=name, p=path: load(n, p), out)
            result = {"name": name, "path": path, "ok": True, "adapter": info}
            line = f"loaded (rank {info.get('rank', '?')})"
        except SLoRAClientError as e:
            result = {"name": name, "path": path, "ok": False,
                      "error": {"code": e.code, "message": e.message}}
            line = f"failed ({e.code}): {e.message}"
        result["seconds"] = round(time.monotonic() - start, 3)
        out.write(f"{label}: {line} in {result['seconds']:.1f}s\n")
        out.flush()
        results.append(result)
    if not names:
        out.write(f"no adapter directories (with {CONFIG_FILE}) under {adapter_root / subdir}\n")
    return results
