"""``cached_launch``: ``kernel[grid](*args, **kwargs)`` at a fraction of Triton's host cost.

A step of a 7B model launches each kernel 32-128 times with arguments that differ only in their
pointers. ``JITFunction.run`` re-derives the kernel's specialization for every launch (binds the
arguments, builds and hashes a key of strings, checks globals): tens of microseconds of host time per
launch on the H200's host, more than the GPU work of most launches in a step that prefills.

``CachedLaunch`` keys each launch by a tuple that is at least as fine as Triton's own
specialization key: per tensor its dtype and 16-byte alignment (unless the parameter is exempt
from alignment specialization); per integer whether it is 1, divisible by 16, and fits in 32
bits (only the last for ``do_not_specialize`` parameters); constexprs and launch options by
value; and the current CUDA device (Triton compiles per device). Two launches with equal keys
therefore get the same compiled kernel from Triton, so the first launch of a key goes through
``kernel[grid]`` (compiling if needed) and later ones call the compiled kernel's launcher
directly. An argument of any other type, Triton's
interpreter, a debug run or launch hooks (profilers) take Triton's own path every time, and so
does every launch when ``SLORA_CACHED_LAUNCH=0`` is set before the kernels are imported (for
A/B measurements, or a Triton release whose compiled-kernel interface differs).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from triton import knobs
from triton.runtime.jit import JITFunction

_ALIGN = 16  # bytes: the pointer alignment Triton specializes on
_I32 = 2**31


class CachedLaunch:
    """Wraps a ``@triton.jit`` kernel; ``wrapper[grid](*args, **kwargs)`` launches it like
    ``kernel[grid]``. Attribute access falls through to the kernel."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        # (name, kind) per parameter; kind: "constexpr", "value" (no specialization), "noalign"
        # (no pointer alignment), "full". None under the interpreter (an InterpretedFunction).
        self._params = [
            (p.name, "constexpr" if p.is_constexpr else
             "value" if p.do_not_specialize else
             "noalign" if p.do_not_specialize_on_alignment else "full")
            for p in kernel.params] if isinstance(kernel, JITFunction) and _enabled() else None
        self._param_names = frozenset(n for n, _ in self._params or ())
        self._compiled: dict[tuple, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name == "kernel":  # (not set yet: a copy being built)
            raise AttributeError(name)
        return getattr(self.kernel, name)

    def __getitem__(self, grid: Any):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        full = None if callable(grid) else self.full_args(args, kwargs)
        spec = None if full is None else self.spec_key(full, kwargs)
        # Triton compiles per device: the current one's
        key = None if spec is None else (spec, torch.cuda.current_device())
        compiled = None if key is None else self._compiled.get(key)
        if compiled is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if key is not None and _launchable(compiled):
                self._compiled[key] = compiled
            return
        grid = tuple(grid) + (1, 1)
        # (as Triton does: the current device's current stream; no launch metadata, no hooks)
        stream = torch._C._cuda_getCurrentRawStream(key[-1])
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function,
                     compiled.packed_metadata, None, None, None, *full)

    def full_args(self, args: tuple, kwargs: dict[str, Any]) -> list | None:
        """Every parameter's value in signature order, or None when this launch must take
        Triton's own path."""
        if self._params is None or not _fast_path_allowed():
            return None
        if len(args) > len(self._params):
            return None
        full = list(args)
        for name, _ in self._params[len(args):]:
            if name not in kwargs:
                return None  # (a default value: left to Triton's binder)
            full.append(kwargs[name])
        return full

    def spec_key(self, full: list, kwargs: dict[str, Any]) -> tuple | None:
        """The launch's specialization (every parameter's value in signature order, and the
        launch options): equal keys, equal Triton specializations. None: not keyable."""
        key: list = []
        for value, (_, kind) in zip(full, self._params):
            if kind == "constexpr":
                key.append(value)
            elif isinstance(value, torch.Tensor):
                key.append(value.dtype if kind == "noalign" else
                           (value.dtype, value.data_ptr() % _ALIGN == 0))
            elif type(value) is int:
                if not -_I32 <= value < _I32:
                    return None
                key.append(0 if kind == "value" else
                           (value == 1) + 2 * (value % _ALIGN == 0) + 4)
            elif type(value) is bool:
                key.append(("bool", value))
            elif type(value) is float or value is None:
                key.append(float if value is not None else None)
            else:
                return None
        # launch options (num_warps, num_stages, launch_pdl, ...) by value
        key.extend((k, v) for k, v in kwargs.items() if k not in self._param_names)
        return tuple(key)


def _enabled() -> bool:
    return os.environ.get("SLORA_CACHED_LAUNCH", "1") != "0"


def _launchable(compiled: Any) -> bool:
    return all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata"))


def _fast_path_allowed() -> bool:
    """CUDA in use (not, e.g., a compile-only run on a machine without it), no debug mode and
    no launch hooks (a profiler such as proton adds them)."""
    runtime = knobs.runtime
    return torch.cuda.is_initialized() and not (runtime.debug or _hooked(runtime.launch_enter_hook)
                or _hooked(runtime.launch_exit_hook))


def _hooked(hook: Any) -> bool:
    # a HookChain (Triton >= 3.4) is never None: it is set when it holds calls
    return hook is not None and bool(getattr(hook, "calls", True))


def cached_launch(kernel: Any) -> CachedLaunch:
    """Decorator form: ``@cached_launch`` above ``@triton.jit``."""
    return CachedLaunch(kernel)
