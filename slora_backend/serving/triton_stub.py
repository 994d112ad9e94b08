"""What both ``model.py`` files share inside a Triton Python-backend stub.

Only the ``model.py`` files import this module (it imports ``triton_python_backend_utils``, which
exists only inside a stub); nothing else in the package does. It holds no torch import, so the
adapter model's stub stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from .engine_json import engine_json_path, read_engine_json
from .errors import error_from_exception
from .inputs import TensorGetter


def repository_root(args: dict) -> Path:
    """The model repository holding the model that ``args`` (``initialize``'s) describes."""
    return Path(args["model_repository"]).resolve().parent


def engine_settings(args: dict) -> tuple[dict[str, Any], Path]:
    """The repository's ``engine.json`` and the directory relative paths in it start from.
    A missing or unreadable file stops the model with an error naming it."""
    root = repository_root(args)
    try:
        return read_engine_json(engine_json_path(root)), root.parent
    except ValueError as e:
        raise pb_utils.TritonModelException(f"{args['model_name']}: {e}") from None


def input_getter(request: Any) -> TensorGetter:
    """``request``'s inputs by name as numpy arrays (None when absent)."""

    def get(name: str):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    return get


def bytes_tensor(name: str, value: str) -> Any:
    return pb_utils.Tensor(name, np.array([value.encode("utf-8")], dtype=np.object_))


def triton_error(exc: BaseException) -> Any:
    """Any exception as a ``TritonError`` with the code a client can act on."""
    error = error_from_exception(exc)
    code = getattr(pb_utils.TritonError, error.code, pb_utils.TritonError.INTERNAL)
    return pb_utils.TritonError(error.wire_message(), code)


def error_response(exc: BaseException) -> Any:
    return pb_utils.InferenceResponse(error=triton_error(exc))
