"""What every benchmark result records about its run: date, command line, machine, versions and
the git commit."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


# nvidia-smi's view of the GPU at one moment (``gpu_state``): clocks and why they are held
# down. Runs on a freshly started H200 have served ~12% less in their first replay with the GPU
# itself slower per step; a sample at the end of each replay tells clock ramps from the rest.
_GPU_STATE_FIELDS = ("pstate", "clocks.sm", "clocks.max.sm", "clocks.mem", "power.draw",
                     "temperature.gpu", "clocks_throttle_reasons.active")


def gpu_state() -> dict[str, str] | None:
    """The first GPU's ``_GPU_STATE_FIELDS`` as nvidia-smi prints them; None without it."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(_GPU_STATE_FIELDS)}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    values = [v.strip() for v in out.stdout.splitlines()[0].split(",")]
    return dict(zip(_GPU_STATE_FIELDS, values))


_CARRIED = (".device", ".vllm")


def _working_tree_hash(root: Path) -> str | None:
    """The git tree of the files as they are (tracked and untracked, less the ignored): equal
    to ``git rev-parse <commit>^{tree}`` of the commit whose files these are, even where the
    checkout's HEAD is stale or the files were copied over (the lent GPU machine's copy)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        # (less the folders a device call carries beside the tree, scripts/h200/README.md,
        # which the copy's git may not know to ignore)
        carried = Path(tmp) / "carried"
        carried.write_text("".join(f"/{d}/\n" for d in _CARRIED))
        try:
            subprocess.run(["git", "-c", f"core.excludesFile={carried}", "add", "-A"], cwd=root,
                           env=env, capture_output=True, timeout=60, check=True)
            return subprocess.run(["git", "write-tree"], cwd=root, env=env, capture_output=True,
                                  text=True, timeout=60, check=True).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None


def run_metadata() -> dict[str, Any]:
    """Date, command line, machine and versions: recorded with every result."""
    import torch

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    argv = list(sys.argv)
    script = Path(argv[0]) if argv else None
    if script is not None and script.suffix == ".py" and script.parent.name == "benchmarks":
        argv[0:1] = ["-m", f"benchmarks.{script.stem}"]  # run as a module
    meta: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *argv]),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "triton": _version("triton"),
        "tritonclient": _version("tritonclient"),
        "git_commit": commit,
        "git_dirty": dirty,
        "git_tree": _working_tree_hash(root),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        meta["gpu"] = props.name
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["cuda"] = torch.version.cuda
    return meta
