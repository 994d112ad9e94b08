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


def test_mixed_replica_splits_a_mixed_steps_host_time_and_restores_the_kernels():
    from slora_kernels import lora_prefill

    from benchmarks import bench_host_overhead

    kernel = lora_prefill._sgmv_shrink_kernel
    result = bench_host_overhead.mixed_replica(6, 16, iters=2)
    assert lora_prefill._sgmv_shrink_kernel is kernel
    lora, base = result["lora"], result["base"]
    assert lora["tokens"] == base["tokens"] == 6 + 16
    assert lora["lora_calls"] > 0 and lora["lora_tables"] > 0 and "lora_calls" not in base
    for side in (lora, base):
        assert side["linear"] > 0 and side["rest"] > 0
        assert abs(sum(v for k, v in side.items() if k not in ("tokens", "execute_ms"))
                   - side["execute_ms"]) < 1e-2
