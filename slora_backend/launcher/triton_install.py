"""Locating a tritonserver and preparing the environment its Python backend stub needs.

Two layouts are known:

- the NGC image (``nvcr.io/nvidia/tritonserver:<yy.mm>-py3``) and the GPU-machine bundle:
  ``/opt/tritonserver/{bin/tritonserver, lib, backends/python}``, with one stub built for the
  image's Python;
- the ``nvidia-pytriton`` wheel from PyPI: ``pytriton/tritonserver/{bin, backends/python,
  python_backend_stubs/3.X}`` with its shared libraries in ``nvidia_pytriton.libs``.

The stub embeds an interpreter. It must be built for the Python that runs the models, load that
Python's own ``libpython`` (its ``LIBDIR`` first on ``LD_LIBRARY_PATH``), and find the virtual
environment's site-packages through the ``python3`` first on ``PATH``. Without any one of these the
stub fails to start or imports the wrong packages. This module imports neither tritonclient nor
the backend utilities: it only finds files and builds environments.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

NGC_ROOT = Path("/opt/tritonserver")
log = logging.getLogger(__name__)
BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
STUB_NAME = "triton_python_backend_stub"


class TritonNotFoundError(RuntimeError):
    """No usable tritonserver installation was found."""


@dataclass(frozen=True)
class TritonInstall:
    """One tritonserver installation and what its Python backend needs."""

    server: Path  # the tritonserver binary
    python_backend: Path  # directory with libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # backend stub built for the running Python's major.minor
    lib_dirs: tuple[Path, ...]  # shared libraries tritonserver and the stub link against
    source: str  # "ngc" or "nvidia-pytriton"

    def describe(self) -> str:
        return f"tritonserver {self.server} ({self.source}), stub {self.stub}"


def python_version_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def stub_python_version(stub: Path) -> str | None:
    """The Python a backend stub embeds ("3.12"), read from the libpython it links against."""
    try:
        data = stub.read_bytes()
    except OSError:
        return None
    match = re.search(rb"libpython(3\.\d+)", data)
    return match.group(1).decode() if match else None


def _ngc_install(root: Path) -> TritonInstall | None:
    server = root / "bin" / "tritonserver"
    backend = root / "backends" / "python"
    stub = backend / STUB_NAME
    if not (server.is_file() and all((backend / f).is_file() for f in BACKEND_FILES)):
        return None
    if not stub.is_file():
        return None
    embedded = stub_python_version(stub)
    if embedded is not None and embedded != python_version_tag():
        # The image's stub embeds another Python: its interpreter would not see our packages.
        log.warning("%s embeds Python %s, this is Python %s: not using it", stub, embedded,
                    python_version_tag())
        return None
    return TritonInstall(
        server=server,
        python_backend=backend,
        stub=stub,
        lib_dirs=tuple(p for p in (root / "lib",) if p.is_dir()),
        source="ngc",
    )


def _pytriton_install() -> TritonInstall | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package / "tritonserver"
    server = root / "bin" / "tritonserver"
    backend = root / "backends" / "python"
    stub = root / "python_backend_stubs" / python_version_tag() / STUB_NAME
    if not server.is_file() or not all((backend / f).is_file() for f in BACKEND_FILES):
        return None
    if not stub.is_file():
        raise TritonNotFoundError(
            f"nvidia-pytriton at {package} has no Python backend stub for Python "
            f"{python_version_tag()} (looked for {stub})"
        )
    libs = package.parent / "nvidia_pytriton.libs"
    return TritonInstall(
        server=server,
        python_backend=backend,
        stub=stub,
        lib_dirs=tuple(p for p in (libs,) if p.is_dir()),
        source="nvidia-pytriton",
    )


def find_tritonserver(ngc_root: Path | None = None) -> TritonInstall:
    """The NGC layout under ``/opt/tritonserver`` (or ``$SLORA_TRITON_ROOT``) first, then the
    nvidia-pytriton package."""
    root = ngc_root or Path(os.environ.get("SLORA_TRITON_ROOT", NGC_ROOT))
    found = _ngc_install(root)
    if found is not None:
        return found
    found = _pytriton_install()
    if found is not None:
        return found
    raise TritonNotFoundError(
        f"no tritonserver for Python {python_version_tag()} found: neither {root}/bin/tritonserver "
        "(the NGC image layout, with a backend stub built for this Python) nor the "
        "nvidia-pytriton package (pip install 'slora-triton[serve]' or nvidia-pytriton==0.7.0)"
    )


def build_backend_dir(install: TritonInstall, dest: Path) -> Path:
    """Lay out ``dest/python/`` with the Python backend and the stub for the running Python.

    Returns ``dest``, to be passed as ``--backend-directory``. Files are symlinked where the
    filesystem allows it and copied otherwise.
    """
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    sources = [install.python_backend / f for f in BACKEND_FILES] + [install.stub]
    for src in sources:
        target = python_dir / src.name
        if target.is_symlink() or target.exists():
            target.unlink()
        try:
            target.symlink_to(src)
        except OSError:
            shutil.copy2(src, target)
    return dest


def python_libdir() -> str | None:
    libdir = sysconfig.get_config_var("LIBDIR")
    return libdir if libdir and Path(libdir).is_dir() else None


def stub_environment(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver so that the stub embeds *this* Python.

    - ``LD_LIBRARY_PATH``: this interpreter's LIBDIR first (a distribution's libpython of the
      same version picked instead breaks the stub), then tritonserver's own libraries.
    - ``PATH``: the directory of this interpreter first: the stub finds its prefix, and so the
      virtual environment's site-packages, from the ``python3`` on PATH.

    The models import ``slora_backend`` from that environment, so the package must be installed
    there (the Makefile's ``.venv`` and the Docker image install it).
    """
    env = dict(os.environ if base is None else base)
    lib_dirs = [d for d in [python_libdir()] if d] + [str(p) for p in install.lib_dirs]
    old_ld = env.get("LD_LIBRARY_PATH", "")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs + ([old_ld] if old_ld else []))
    bin_dir = str(Path(sys.executable).parent)
    old_path = env.get("PATH", "")
    env["PATH"] = os.pathsep.join([bin_dir] + ([old_path] if old_path else []))
    _check_python3_on_path(bin_dir)
    return env


def _check_python3_on_path(bin_dir: str) -> None:
    if not (Path(bin_dir) / "python3").exists():
        raise TritonNotFoundError(
            f"{bin_dir} has no python3: the backend stub finds its packages through the python3 "
            f"first on PATH; run the launcher with a virtualenv's python or add a python3 link"
        )
