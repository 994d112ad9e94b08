"""The launcher's parts without a server: waiting for the server's whole process group, and
locating tritonserver with the Python backend stub's environment."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from slora_backend.launcher import group_alive, wait_group_exit
from slora_backend.launcher.triton_install import (
    build_backend_dir,
    find_tritonserver,
    stub_environment,
    stub_python_version,
)


def test_wait_group_exit_waits_for_children_that_outlive_the_leader():
    """TritonServer.stop waits for the whole process group: after tritonserver exits, its stubs
    (and the engine process) may run on for a moment holding the GPU's memory."""
    import signal
    import subprocess

    leader = subprocess.Popen(["sh", "-c", "sleep 30 & echo forked; wait"],
                              start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert leader.stdout.readline() == "forked\n"  # the child exists
        leader.kill()
        leader.wait(5)  # the leader is gone, its child is not
        assert group_alive(leader.pid)
        assert not wait_group_exit(leader.pid, 0.2)
        os.killpg(leader.pid, signal.SIGKILL)
        assert wait_group_exit(leader.pid, 10.0)  # an unreaped zombie child counts as gone
        assert not group_alive(leader.pid)
    finally:
        try:
            os.killpg(leader.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        leader.stdout.close()


def test_triton_install_and_stub_environment(tmp_path):
    install = find_tritonserver(ngc_root=tmp_path / "no-such-root")
    assert install.source == "nvidia-pytriton"
    import sys

    assert stub_python_version(install.stub) == f"{sys.version_info.major}.{sys.version_info.minor}"
    backends = build_backend_dir(install, tmp_path / "backends")
    names = sorted(p.name for p in (backends / "python").iterdir())
    assert names == ["libtriton_python.so", "triton_python_backend_stub",
                     "triton_python_backend_utils.py"]
    env = stub_environment(install, base={"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/old"})
    ld = env["LD_LIBRARY_PATH"].split(":")
    assert ld[0] == sysconfig.get_config_var("LIBDIR")  # this Python's libpython first
    assert ld[-1] == "/old"
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_ngc_layout_with_another_pythons_stub_is_skipped(tmp_path):
    install = find_tritonserver(ngc_root=tmp_path / "none")
    root = tmp_path / "ngc"
    (root / "bin").mkdir(parents=True)
    (root / "backends" / "python").mkdir(parents=True)
    (root / "bin" / "tritonserver").write_bytes(b"")
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (root / "backends" / "python" / f).write_bytes(b"")
    (root / "backends" / "python" / "triton_python_backend_stub").write_bytes(
        b"\x7fELF...libpython3.2.so.1.0...")
    assert find_tritonserver(ngc_root=root).source == "nvidia-pytriton"  # 3.2 is not us
    import sys

    tag = f"{sys.version_info.major}.{sys.version_info.minor}".encode()
    (root / "backends" / "python" / "triton_python_backend_stub").write_bytes(
        b"\x7fELF...libpython" + tag + b".so.1.0...")
    assert find_tritonserver(ngc_root=root).source == "ngc"
    assert install.server.is_file()
