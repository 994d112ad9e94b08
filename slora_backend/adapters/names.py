"""The one rule for adapter names, and where a name leads under the adapter root.

An adapter name is also the name of its directory under the adapter root (first-use loading
looks for ``<adapter_root>/<name>``), so a valid name is exactly a valid directory name:

- a non-empty ``str`` that encodes to UTF-8 (any script: names travel as UTF-8 everywhere),
- at most ``MAX_NAME_BYTES`` (255) bytes in UTF-8, the limit of Linux file systems,
- without a NUL character or a path separator (``/``, or the platform's own),
- not ``.`` or ``..``.

This module imports nothing heavy (no torch, no numpy): the ``slora_adapters`` Triton model
checks names with it in a process that never loads torch.

Paths are handed to the OS as UTF-8 bytes (``fs_path``), whatever the process's file system
encoding: the Triton Python stub embeds an interpreter that keeps the C locale, so its file
system encoding is ASCII and a ``str`` path with any other character raises
``UnicodeEncodeError`` there (while the engine's own process, a regular ``python``, uses UTF-8).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import AdapterLoadError

MAX_NAME_BYTES = 255
REGISTRY_FILE = "registry.json"  # <adapter_root>/registry.json: registered names -> paths
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_SEPARATORS = {"/", os.sep} | ({os.altsep} if os.altsep else set())


class InvalidAdapterNameError(AdapterLoadError):
    """A name that cannot be an adapter directory's name (INVALID_ARG)."""


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be an adapter name, or None when it can."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name:
        return "must not be empty"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as e:
        return f"is not valid Unicode: character {name[e.start]!r} at position {e.start} has no UTF-8 form"
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long in UTF-8; at most {MAX_NAME_BYTES} are allowed (a directory name)"
    if "\0" in name:
        return f"contains a NUL character at position {name.index(chr(0))}"
    separators = sorted(s for s in _SEPARATORS if s in name)
    if separators:
        return f"contains the path separator {separators[0]!r}; a name is one directory name"
    if name in (".", ".."):
        return f"{name!r} names a directory itself, not an adapter"
    return None


def _shown(name: object) -> str:
    """``name`` as an error message shows it: long names are cut (a 10,000-character name
    would otherwise fill the message)."""
    text = repr(name)
    return text if len(text) <= 80 else f"{text[:60]}...{text[-10:]} ({len(text)} characters)"


def check_adapter_name(name: object, error: type[Exception] = InvalidAdapterNameError) -> str:
    """``name`` if it is a valid adapter name; raises ``error`` saying why not.

    Registering an invalid name is a bad argument (``InvalidAdapterNameError``, INVALID_ARG);
    looking one up finds nothing (callers pass ``AdapterNotFoundError``, NOT_FOUND)."""
    problem = name_problem(name)
    if problem is not None:
        raise error(f"adapter name {_shown(name)} {problem}")
    return name  # type: ignore[return-value]  (name_problem checked it is a str)


def fs_path(path: str | os.PathLike[str]) -> bytes:
    """``path`` as the bytes the OS sees: UTF-8 (surrogate escapes give back undecodable bytes)."""
    return os.fspath(path).encode("utf-8", "surrogateescape")


def _from_fs(raw: bytes) -> Path:
    return Path(raw.decode("utf-8", "surrogateescape"))


def real_path(path: str | os.PathLike[str]) -> Path:
    """``os.path.realpath`` of ``path``, through ``fs_path``."""
    return _from_fs(os.path.realpath(fs_path(path)))  # resolves '..' and every symlink


def resolve_under_root(root: Path | None, path: str | os.PathLike[str]) -> Path:
    """The real path of ``path`` (relative to ``root`` unless absolute), refused outside ``root``."""
    if root is None:
        raise AdapterLoadError("no adapter_root is configured: adapters can only load from under it")
    if "\0" in os.fspath(path):
        raise AdapterLoadError(f"adapter path {_shown(os.fspath(path))} contains a NUL character")
    root_real = real_path(root)
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = root_real / candidate
    real = real_path(candidate)
    if real != root_real and root_real not in real.parents:
        raise AdapterLoadError(f"adapter path {_shown(str(path))} is outside the adapter root "
                               f"{str(root_real)!r}")
    return real


def adapter_dir(root: Path, name: str) -> Path | None:
    """``<root>/<name>`` (resolved) when ``name`` is a valid name and that directory holds an
    adapter config and lies inside ``root``; None otherwise."""
    if name_problem(name) is not None:
        return None
    try:
        path = resolve_under_root(root, name)
        found = path != real_path(root) and os.path.isfile(fs_path(path / CONFIG_FILE))
    except (AdapterLoadError, OSError):
        return None
    return path if found else None
