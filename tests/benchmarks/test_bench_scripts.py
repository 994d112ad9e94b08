"""The CPU-runnable benchmark scripts run and report every field (tiny sizes)."""

from __future__ import annotations

from benchmarks import bench_adapter_reads


def test_adapter_reads_benchmark_reports_both_sides(tmp_path):
    out = bench_adapter_reads.main(["--shape", "tiny-gqa", "--adapters", "3", "--steps", "3",
                                    "--ops", "50", "--dir", str(tmp_path),
                                    "--json", str(tmp_path / "r.json")])
    assert out["reads_per_s"] > 0 and out["step_ms_alone"] > 0 and out["slowdown"] > 0
    assert (tmp_path / "r.json").is_file()
