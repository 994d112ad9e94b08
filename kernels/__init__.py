"""Triton-lang kernels for S-LoRA serving (import name ``slora_kernels``), each beside its torch
reference. ``docs/kernels.md`` describes them.

Without CUDA the kernels can only run in Triton's interpreter, and Triton reads that choice
(``TRITON_INTERPRET=1``) when ``triton.language`` is first imported. So importing this package on
a machine without CUDA turns the interpreter on, unless the variable is already set either way;
the launchers refuse CPU tensors when it is off.
"""

from __future__ import annotations

import os


def _choose_interpreter() -> None:
    if "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_choose_interpreter()
