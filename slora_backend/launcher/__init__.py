"""The launcher: ``slora-serve`` / ``python -m slora_backend.serve``.

- ``cli``: the command line (flags -> ``ServeOptions``), ``main``.
- ``options``: ``ServeOptions``, the base model and adapter root it resolves, the engine
  settings it writes.
- ``repository``: the generated copy of ``model_repository/`` with its ``engine.json``.
- ``triton_install``: finding tritonserver (the NGC layout or the nvidia-pytriton wheel) and the
  environment its Python backend stub needs.
- ``server``: ``TritonServer``, starting, waiting for and stopping one tritonserver.
"""

from .cli import main, parse_args
from .options import SOURCE_REPOSITORY, ServeOptions, resolve_adapter_root, resolve_base_model
from .repository import write_repository
from .server import ServerError, TritonServer, free_ports, group_alive, port_is_free, wait_group_exit

__all__ = [
    "SOURCE_REPOSITORY", "ServeOptions", "ServerError", "TritonServer", "free_ports", "group_alive",
    "main", "parse_args", "port_is_free", "resolve_adapter_root", "resolve_base_model",
    "wait_group_exit", "write_repository",
]
