"""What the launcher serves: ``ServeOptions`` and the engine settings they write.

The engine settings go into the generated repository's ``engine.json`` (``engine_settings``):
every engine flag is written, ``None`` (JSON ``null``) meaning the engine's default; keys the
flags do not name keep the source repository's values.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
SOURCE_REPOSITORY = PROJECT_ROOT / "model_repository"
DEMO_ADAPTERS = PROJECT_ROOT / "demo_adapters"
ADMIN_TOKEN_ENV = "SLORA_ADMIN_TOKEN"


@dataclass
class ServeOptions:
    base_model: str = "smollm2"
    tokenizer: str | None = None
    adapter_root: str | None = None
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "0.0.0.0"
    device: str = "auto"
    dtype: str = "auto"
    kernel_backend: str | None = None
    pool_pages: int | None = None
    max_num_seqs: int | None = None
    tensor_parallel_size: int | None = None
    max_model_len: int | None = None
    max_tokens_limit: int | None = None
    engine_params: dict[str, Any] = field(default_factory=dict)  # any other engine.json key
    admin_token: str | None = None  # required by adapter load / unload / abort when set
    work_dir: str | None = None
    source_repository: str = str(SOURCE_REPOSITORY)
    log_verbose: int = 0
    tritonserver_args: list[str] = field(default_factory=list)

    def engine_settings(self) -> dict[str, Any]:
        """The ``engine.json`` keys these options set."""
        settings: dict[str, Any] = {
            "base_model": resolve_base_model(self.base_model),
            "tokenizer": _abs(self.tokenizer) if self.tokenizer else None,
            "adapter_root": str(resolve_adapter_root(self.adapter_root)),
            "device": self.device,
            "dtype": self.dtype,
            "kernel_backend": self.kernel_backend,
            "pool_pages": self.pool_pages,
            "max_num_seqs": self.max_num_seqs,
            "tensor_parallel_size": self.tensor_parallel_size,
            "max_model_len": self.max_model_len,
            "max_tokens_limit": self.max_tokens_limit,
        }
        settings.update({k: json_value(v) for k, v in self.engine_params.items()})
        return settings


def json_value(raw: Any) -> Any:
    """A ``--engine-param`` value as JSON: ``32`` -> 32, ``false`` -> False, ``null`` -> None;
    text that is not JSON stays a string. Non-string values pass unchanged."""
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _abs(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def resolve_base_model(base_model: str) -> str:
    """``smollm2`` (the default) -> its cached HF directory, converting it on first use; a GGUF
    file or HF directory -> its absolute path; ``random:<shape>`` unchanged."""
    if base_model == "smollm2":
        from ..default_model import smollm2_dir

        return str(smollm2_dir())
    if base_model.startswith("random:"):
        return base_model
    path = Path(base_model).expanduser().resolve()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SystemExit(f"--base-model: GGUF file {path} does not exist")
    elif not (path / "config.json").is_file():
        raise SystemExit(
            f"--base-model: {path} is neither a GGUF file nor a Hugging Face directory "
            "(config.json, *.safetensors and the tokenizer)"
        )
    return str(path)


def resolve_adapter_root(adapter_root: str | None) -> Path:
    """The given root (created if missing), or the checkout's ``demo_adapters/`` when writable
    (``registry.json`` is written there and git-ignored), else a copy of it in the cache."""
    if adapter_root:
        root = Path(adapter_root).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return root
    if DEMO_ADAPTERS.is_dir() and os.access(DEMO_ADAPTERS, os.W_OK):
        return DEMO_ADAPTERS
    from ..default_model import cache_root

    root = cache_root() / "adapters"
    root.mkdir(parents=True, exist_ok=True)
    if DEMO_ADAPTERS.is_dir():
        for src in DEMO_ADAPTERS.iterdir():
            if (src / "adapter_config.json").is_file() and not (root / src.name).exists():
                shutil.copytree(src, root / src.name)
    return root
