"""Random PEFT adapters for a setting, generated once into a cache and reused.

One directory per (setting, base shape): adapter i is ``adapter_name(setting, i, rank)``, so the
set for n = 5 is a prefix of the set for n = 2000 and a larger run extends a smaller one. Files
are written in parallel worker processes, each into ``<name>.partial`` and renamed when complete
(an interrupted run never leaves a half-written adapter behind).

``registry.json`` (the engine's persisted registry, see slora_backend/adapters/registry.py) is
written to list exactly the adapters a run uses, so an engine or a tritonserver started on the
directory registers them at start-up without one registry rewrite per adapter.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from slora_backend.model_spec import ModelSpec

from .synthetic_adapters import write_random_adapter
from .workload import LORA_TARGETS, AdapterSpec, adapter_specs, get_setting

REGISTRY_FILE = "registry.json"  # slora_backend.adapters.names.REGISTRY_FILE
DEFAULT_CACHE = Path(os.environ.get("SLORA_BENCH_CACHE",
                                    Path.home() / ".cache" / "slora-triton" / "bench-adapters"))


def model_spec(base_shape_or_dir: str) -> ModelSpec:
    """ModelSpec of ``random:<shape>`` / ``<shape>`` or a Hugging Face directory."""
    from slora_backend.model_loader import RANDOM_SHAPES, random_config

    name = base_shape_or_dir.removeprefix("random:")
    if name in RANDOM_SHAPES:
        return ModelSpec.from_hf_config(random_config(name))
    from transformers import AutoConfig

    return ModelSpec.from_hf_config(AutoConfig.from_pretrained(base_shape_or_dir))


def adapter_bytes(spec: ModelSpec, rank: int, targets: Sequence[str] = LORA_TARGETS,
                  dtype_bytes: int = 2) -> int:
    """Bytes of one adapter's weights (A and B of every target, every layer)."""
    from slora_backend.layout import PoolLayout

    dims = PoolLayout(spec).module_dims
    return spec.num_layers * rank * sum(sum(dims[m]) for m in targets) * dtype_bytes


def set_dir(cache: Path, setting: str, base: str) -> Path:
    tag = base.removeprefix("random:").replace("/", "_").strip("_") or "model"
    return Path(cache) / f"{setting}-{tag}"


def fitting_prefix(specs: Sequence[AdapterSpec], spec: ModelSpec, max_total_bytes: int,
                   max_new_bytes: int, present: Sequence[bool]) -> int:
    """How many of ``specs`` (a prefix) fit: the whole prefix within ``max_total_bytes`` and the
    adapters not yet on disk (``present[i]`` false) within ``max_new_bytes``."""
    total = new = 0
    for i, (a, on_disk) in enumerate(zip(specs, present)):
        size = adapter_bytes(spec, a.rank)
        total += size
        new += 0 if on_disk else size
        if total > max_total_bytes or new > max_new_bytes:
            return i
    return len(specs)


def _write_one(args: tuple[str, str, int, int, str]) -> str:
    out, base, rank, seed, dtype = args
    torch.set_num_threads(1)
    final = Path(out)
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_random_adapter(tmp, model_spec(base), rank, LORA_TARGETS, alpha=2 * rank, seed=seed,
                         dtype=getattr(torch, dtype))
    tmp.rename(final)
    return final.name


def ensure_adapter_set(cache: Path, setting: str, n: int, base: str | None = None,
                       workers: int | None = None, dtype: str = "float16",
                       log=print) -> Path:
    """Write the missing adapters of the first ``n`` of ``setting`` under the cache; returns the
    set's directory (an adapter root)."""
    base = base or f"random:{get_setting(setting).base_shape}"
    root = set_dir(cache, setting, base)
    root.mkdir(parents=True, exist_ok=True)
    specs = adapter_specs(setting, n)
    missing = [a for a in specs if not (root / a.name / "adapter_model.safetensors").is_file()]
    if missing:
        workers = workers or max(1, min(len(missing), (os.cpu_count() or 2) - 1, 16))
        size = sum(adapter_bytes(model_spec(base), a.rank) for a in missing)
        log(f"writing {len(missing)} adapters of {setting} ({size / 1e9:.1f} GB) to {root} "
            f"with {workers} workers")
        jobs = [(str(root / a.name), base, a.rank, _seed(a.name), dtype) for a in missing]
        if workers == 1:
            for job in jobs:
                _write_one(job)
        else:
            # spawn, not fork: the caller may already hold a CUDA context and an engine thread.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                list(pool.map(_write_one, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    return root


def _seed(name: str) -> int:
    return int(name.split("-")[1])  # the adapter's index: distinct weights per adapter


def registered_set(cache: Path, setting: str, n: int, base: str | None = None,
                   **ensure_kwargs) -> tuple[Path, list[str]]:
    """The first ``n`` adapters of ``setting`` on disk (``ensure_adapter_set``), registered for an
    engine on the returned root to load at start-up; returns (root, their names)."""
    root = ensure_adapter_set(cache, setting, n, base=base, **ensure_kwargs)
    names = [a.name for a in adapter_specs(setting, n)]
    write_registry(root, names)
    return root, names


def write_registry(root: Path, names: Sequence[str]) -> None:
    """Make ``names`` the adapters an engine on ``root`` registers at start-up."""
    tmp = root / (REGISTRY_FILE + ".tmp")
    tmp.write_text(json.dumps({"adapters": {n: n for n in names}}, indent=1, sort_keys=True))
    tmp.replace(root / REGISTRY_FILE)
