"""Kernel tests run on CUDA when there is one, else in Triton's interpreter on CPU.

Triton reads TRITON_INTERPRET when ``triton.language`` is first imported, so it is set here,
before any test module imports a kernel (``slora_kernels`` would also set it on import).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
