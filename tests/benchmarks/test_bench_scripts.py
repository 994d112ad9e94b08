"""The CPU-runnable benchmark scripts run and report every field (tiny sizes)."""

from __future__ import annotations

from benchmarks import bench_adapter_reads


def test_adapter_reads_benchmark_reports_both_sides(tmp_path):
    out = bench_adapter_reads.main(["--shape", "tiny-gqa", "--adapters", "3", "--steps", "3",
                                    "--ops", "50", "--dir", str(tmp_path),
                                    "--json", str(tmp_path / "r.json")])
    assert out["reads_per_s"] > 0 and out["step_ms_alone"] > 0 and out["slowdown"] > 0
    assert (tmp_path / "r.json").is_file()


def test_step_metadata_benchmark_times_both_sides():
    from benchmarks import bench_host_overhead

    result = bench_host_overhead.step_metadata(8, "cpu", iters=3)
    assert result["lora_execute_ms"] > 0 and result["base_execute_ms"] > 0
    assert result["lora_lora_tables_ms"] > 0 and result["base_lora_tables_ms"] == 0
