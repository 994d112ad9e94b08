"""perf_analyzer (the binary `make perf-analyzer` installs) drives the `slora` ensemble over gRPC
streaming with the project's input-data generator, mixing adapters and the base model."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from slora_client import SLoRAClient

from tests.serving.conftest import make_adapter_root, running_server, server_options

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MAX_TOKENS = 16


def perf_analyzer_binary() -> str:
    candidates = [os.environ.get("PERF_ANALYZER", ""),
                  str(REPO / ".tools" / "perf_analyzer" / "perf_analyzer"),
                  shutil.which("perf_analyzer") or ""]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    pytest.fail("perf_analyzer is not installed: run `make perf-analyzer` "
                "(benchmarks/perf_analyzer/install.sh)")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gqa, adapter_pool):
    tmp = tmp_path_factory.mktemp("e2e-perf")
    root = make_adapter_root(adapter_pool, tmp / "adapters")
    with running_server(server_options(tiny_gqa, root), tmp / "server.log") as s:
        yield s


def test_perf_analyzer_streams_slora(server, tmp_path):
    data = tmp_path / "inputs.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks/perf_analyzer/make_inputs.py"),
                    "--adapters", "r8-qv,r4-mlp,r32-all", "--base", "--ignore-eos",
                    "--max-tokens", str(MAX_TOKENS), "--out", str(data)], check=True)
    report = tmp_path / "report.csv"
    command = [
        perf_analyzer_binary(), "-m", "slora", "-u", server.grpc_url, "-i", "grpc", "--async",
        "--streaming", "--input-data", str(data), "--concurrency-range", "1:4:3",
        # A functional run, not a measurement: count windows and a loose stability criterion,
        # so that a busy CI machine still finishes.
        "--measurement-mode", "count_windows", "--measurement-request-count", "8",
        "--stability-percentage", "999", "--max-trials", "3", "-f", str(report),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Detected decoupled model" in run.stdout
    rows = list(csv.DictReader(report.open()))
    assert [r["Concurrency"] for r in rows] == ["1", "4"], rows
    for row in rows:
        requests_per_s = float(row["Inferences/Second"])
        responses_per_s = float(row["Response Throughput"])
        assert requests_per_s > 0
        # Every request streams one response per generated token.
        assert responses_per_s == pytest.approx(requests_per_s * MAX_TOKENS, rel=0.25)
    with SLoRAClient(server.grpc_url) as client:
        stats = client.stats()
        names = {a["name"] for a in client.list_adapters()}
    assert {"r8-qv", "r4-mlp", "r32-all"} <= names  # loaded on first use by the adapter step
    assert stats["request_errors"] == 0
