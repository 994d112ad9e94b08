"""Where adapters live on disk: file names and the rule that keeps every path under the root.

No torch here: the adapter model's stub checks names with these in its own process.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import AdapterLoadError

CONFIG_FILE = "adapter_config.json"
REGISTRY_FILE = "registry.json"


def resolve_under_root(root: Path | None, path: str | os.PathLike[str]) -> Path:
    """The real path of ``path`` (relative to ``root`` unless absolute), refused outside ``root``."""
    if root is None:
        raise AdapterLoadError("no adapter_root is configured: adapters can only load from under it")
    root_real = Path(os.path.realpath(root))
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = root_real / candidate
    real = Path(os.path.realpath(candidate))  # resolves '..' and every symlink
    if real != root_real and root_real not in real.parents:
        raise AdapterLoadError(f"adapter path {str(path)!r} is outside the adapter root {str(root_real)!r}")
    return real
