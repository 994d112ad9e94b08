"""Triton-lang kernels for S-LoRA serving (import name ``slora_kernels``), each beside its torch
reference. ``docs/kernels.md`` describes them.

Without CUDA the kernels can only run in Triton's interpreter, and Triton reads that choice
(``TRITON_INTERPRET=1``) when ``triton.language`` is first imported. So importing this package on
a machine without CUDA turns the interpreter on, unless the variable is already set either way;
the launchers refuse CPU tensors when it is off.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path


def _yield_the_name_kernels() -> bool:
    """Imported as ``kernels`` rather than ``slora_kernels``, this folder only shadows another
    package: the repository root is on ``sys.path`` (``python -m ...`` from the root, pytest),
    and Hugging Face's ``kernels`` distribution lies further down (transformers 5.25 requires it
    and imports it as soon as a model's configuration loads). Load that one under the name
    instead; say whether it was found (if not, this folder keeps the name, harmlessly)."""
    root = Path(__file__).resolve().parent.parent
    path = [p for p in sys.path if Path(p or ".").resolve() != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # (the import statement returns what sys.modules holds)
    spec.loader.exec_module(module)
    return True


def _choose_interpreter() -> None:
    if "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


if __name__ != "kernels" or not _yield_the_name_kernels():
    _choose_interpreter()
