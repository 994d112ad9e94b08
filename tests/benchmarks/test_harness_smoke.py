"""The workload harness at a tiny scale (CPU, random tiny GQA model, 20 adapters, a few seconds):
every report field is present and baselines (a)-(d) run on the same requests."""

from __future__ import annotations

import gzip
import json

import pytest

from benchmarks import bench_decode_step, harness

TINY = ["--base-model", "random:tiny-gqa", "--device", "cpu", "--dtype", "float32",
        "--setting", "S2", "--n", "20", "--alpha", "0.5", "--rate", "8", "--duration", "2",
        "--input-range", "8", "24", "--output-range", "2", "12", "--seed", "3"]

COMMON_FIELDS = (
    "setting", "n", "alpha", "rate", "cv", "system", "label", "requests_planned",
    "requests_submitted", "requests_completed", "finish_reasons", "wall_s", "throughput_req_s",
    "throughput_out_tok_s", "output_tokens", "ttft_avg_s", "ttft_p50_s", "ttft_p90_s",
    "ttft_p99_s", "latency_avg_s", "slo_s", "slo_attainment", "truncated",
)
ENGINE_FIELDS = (
    "pool_pages_total", "pool_occupancy_avg", "pool_occupancy_max", "pool_kv_pages_avg",
    "pool_adapter_pages_avg", "adapter_hit_ratio", "adapter_loads", "adapter_evictions",
    "preemptions", "engine_config",
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def report(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    harness.main([*TINY, "--baselines", "a,b,c,d", "--cache", str(cache),
                  "--slora-variant", "fifo:newest_first_after_s=null,admit_wait_steps=2",
                  "--json", str(out / "r.json"), "--markdown", str(out / "r.md")])
    return json.loads((out / "r.json").read_text()), (out / "r.md").read_text()


def test_every_system_ran_every_request(report):
    data, _ = report
    rows = {r["system"]: r for r in data["results"]}
    assert set(rows) == {"slora", "slora:fifo", "peft", "no_lora", "bmm", "no_unified"}
    expected_tokens = data["workload"]["summary"]["total_output_tokens"]
    for system, r in rows.items():
        missing = [f for f in COMMON_FIELDS if f not in r]
        assert not missing, f"{system} lacks {missing}"
        assert r["requests_completed"] == r["requests_planned"] == 16, system
        assert r["finish_reasons"] == {"length": 16}, system
        assert r["output_tokens"] == expected_tokens, system  # ignore_eos: exact lengths
        assert r["throughput_req_s"] > 0 and r["ttft_p50_s"] is not None
        assert 0 <= r["slo_attainment"] <= 1
        assert not r["truncated"]


def test_engine_rows_report_pool_and_adapters(report):
    data, _ = report
    rows = {r["system"]: r for r in data["results"]}
    for system in ("slora", "slora:fifo", "no_lora", "bmm", "no_unified"):
        missing = [f for f in ENGINE_FIELDS if f not in rows[system]]
        assert not missing, f"{system} lacks {missing}"
    # a --slora-variant: the engine with its changes, nothing else changed
    variant, default = rows["slora:fifo"]["engine_config"], rows["slora"]["engine_config"]
    assert variant["newest_first_after_s"] is None and variant["admit_wait_steps"] == 2
    assert {k: v for k, v in variant.items() if k not in ("newest_first_after_s",
            "admit_wait_steps")} == {k: v for k, v in default.items()
                                     if k not in ("newest_first_after_s", "admit_wait_steps")}
    assert rows["slora:fifo"]["label"] == "S-LoRA with admit_wait_steps=2, newest_first_after_s=None"
    assert rows["no_lora"]["adapter_hit_ratio"] is None  # no adapters at all
    assert rows["no_lora"]["pool_adapter_pages_avg"] == 0
    assert 0 <= rows["slora"]["adapter_hit_ratio"] <= 1
    assert rows["bmm"]["engine_config"]["lora_ops"] == "bmm"
    assert rows["no_unified"]["engine_config"]["adapter_pool_pages"] > 0
    assert rows["no_unified"]["adapter_partition_pages"] > 0
    assert rows["slora"]["engine_config"]["adapter_pool_pages"] is None
    assert rows["peft"]["peft_adapter_swaps"] >= 1


def test_report_records_parameters_and_table(report):
    data, md = report
    meta = data["meta"]
    for key in ("date", "command", "host", "python", "torch", "transformers", "peft", "git_commit"):
        assert key in meta
    cfg = data["workload"]["config"]
    assert (cfg["setting"], cfg["num_adapters"], cfg["alpha"], cfg["rate"]) == ("S2", 20, 0.5, 8.0)
    assert data["args"]["baselines"] == ["a", "b", "c", "d"]
    comparison = next(iter(data["comparisons"].values()))
    for key in ("slora_over_no_lora", "slora_over_peft", "slora_over_bmm",
                "slora_over_no_unified"):
        assert comparison[key] > 0
    lines = md.strip().splitlines()
    assert lines[0].startswith("| setting |") and len(lines) == 2 + 6


def test_time_limit_truncates_and_says_so(cache):
    report = harness.run(harness.normalize(harness.build_parser().parse_args(
        [*TINY, "--duration", "4", "--time-limit", "1.0", "--cache", str(cache)])),
        log=lambda *_: None)
    (row,) = report["results"]
    assert row["truncated"] and "limit" in row["note"]
    assert row["requests_planned"] < row["requests_in_trace"]


def test_preloaded_adapters_are_in_host_memory_before_the_trace(cache):
    report = harness.run(harness.normalize(harness.build_parser().parse_args(
        [*TINY, "--engine-param", "preload_adapters=true", "--cache", str(cache)])),
        log=lambda *_: None)
    (row,) = report["results"]
    assert row["engine_config"]["preload_adapters"] is True
    # All 20, though the trace's 16 requests use fewer: read before it, not on first use.
    assert row["requests_in_trace"] < 20 and row["adapters_host"] == 20


def test_decode_step_bandwidth_bench(cache):
    result = bench_decode_step.main([
        "--base-model", "random:tiny-gqa", "--device", "cpu", "--dtype", "float32",
        "--batch", "4", "--context", "16", "--warmup", "1", "--iters", "3",
        "--mixed-prompt", "12", "--cache", str(cache), "--bandwidth", "1e10"])
    for part in ("lora", "base"):
        r = result[part]
        assert r["batch"] == 4 and r["step_ms_median"] > 0 and r["bound_ms"] > 0
        assert r["bytes_total"] == r["bytes_weights"] + r["bytes_kv"] + r["bytes_adapters"]
    assert result["lora"]["distinct_adapters"] == 4 and result["lora"]["bytes_adapters"] > 0
    assert result["base"]["bytes_adapters"] == 0
    assert result["lora"]["context_len_mean"] > 16
    assert all(result[p]["mixed_prompt"] == 12 and result[p]["mixed_step_ms_median"] > 0
               for p in ("lora", "base"))


def test_step_profile_of_a_replay(cache, tmp_path):
    """--profile-dir: per-step phases and batch shapes, the Triton compiles seen (none on CPU:
    the torch ops), and with --cprofile the engine thread's hottest functions."""
    harness.run(harness.normalize(harness.build_parser().parse_args(
        [*TINY, "--cache", str(cache), "--profile-dir", str(tmp_path), "--cprofile"])),
        log=lambda *_: None)
    report = json.loads((tmp_path / "slora_steps.json").read_text())
    assert report["steps"] == report["decode_steps"] + report["mixed_steps"] > 0
    assert report["mixed_steps"] > 0  # every prompt is prefilled in some step
    assert set(report["phases"]) == {"step", "schedule", "copy_wait", "execute", "prefetch",
                                     "sample", "read", "execute_cpu", "lora_tables", "lora_ops",
                                     "attention_ops"}
    # (no graph fill, no GPU span on CPU)
    assert report["triton_compiles"] == [] and len(report["timeline"]) == report["steps"]
    assert "engine.py" in (tmp_path / "slora_pstats.txt").read_text()


def test_kernel_trace_covers_the_requested_steps(cache, tmp_path):
    """--kernel-trace FIRST:COUNT profiles exactly those steps (on CPU the torch ops stand in
    for kernels) and reports time per name against the window's wall time; --timeline writes
    the window's timeline as a Chrome trace."""
    harness.run(harness.normalize(harness.build_parser().parse_args(
        [*TINY, "--cache", str(cache), "--profile-dir", str(tmp_path), "--kernel-trace", "2:3",
         "--timeline"])),
        log=lambda *_: None)
    trace = json.loads(gzip.decompress((tmp_path / "slora_timeline0.json.gz").read_bytes()))
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
    assert not (tmp_path / "slora_timeline1.json.gz").exists()  # a window is one trace
    report = json.loads((tmp_path / "slora_steps.json").read_text())
    kernels = report["kernels"]
    assert kernels["steps"] == 3 and kernels["tokens"] == sum(
        s["tokens"] for s in report["timeline"][2:5])
    names = [k["name"] for k in kernels["by_kernel"]]
    assert any(n.startswith("aten::") for n in names) and all(k["calls"] > 0 for k in kernels["by_kernel"])
    assert 0 < kernels["kernel_ms"] and kernels["wall_ms"] > 0
    with pytest.raises(SystemExit):
        harness.build_parser().parse_args([*TINY, "--kernel-trace", "3"])
    for bad in ("prefill:3", "decode@x:3", "decode@:3"):
        with pytest.raises(SystemExit):
            harness.build_parser().parse_args([*TINY, "--kernel-trace", bad])


@pytest.mark.parametrize("kind", ["mixed", "decode", "decode@2"])
def test_kernel_trace_of_one_kind_of_step(kind, cache, tmp_path):
    """--kernel-trace mixed:N / decode:N profiles the next N steps of that kind only;
    decode@B:N the next N decode steps of at least B sequences."""
    harness.run(harness.normalize(harness.build_parser().parse_args(
        [*TINY, "--cache", str(cache), "--profile-dir", str(tmp_path), "--kernel-trace",
         f"{kind}:2"])), log=lambda *_: None)
    report = json.loads((tmp_path / "slora_steps.json").read_text())
    kernels = report["kernels"]
    assert kernels["steps"] == 2
    assert kernels["mixed_steps"] == (2 if kind == "mixed" else 0)
    assert kernels["kernel_ms"] > 0 and kernels["gpu_span_ms"] is None  # (no GPU here)
    if kind == "decode@2":
        decode_batches = [s["batch"] for s in report["timeline"]
                          if s.get("batch") and s["tokens"] == s["batch"]]
        assert min(decode_batches) < 2 <= min(kernels["batches"])  # smaller ones were skipped


def test_a_failing_system_gives_an_error_row_and_the_others_still_run(cache):
    from slora_backend.launcher import free_ports

    (port,) = free_ports(1)  # nothing listens there
    report = harness.run(harness.normalize(harness.build_parser().parse_args(
        [*TINY, "--no-slora", "--baselines", "b", "--triton-url", f"127.0.0.1:{port}",
         "--duration", "1", "--cache", str(cache)])), log=lambda *_: None)
    rows = {r["system"]: r for r in report["results"]}
    assert rows["no_lora"]["requests_completed"] == rows["no_lora"]["requests_planned"] > 0
    assert "error" in rows["slora_triton"] and "failed" in rows["slora_triton"]["note"]
    assert "| slora_triton |" in report["markdown"]


def test_decode_step_bench_keeps_the_batch_full_through_a_chunked_prefill(cache):
    """With prompts prefilled over many steps, the first requests decode that many steps ahead
    of the last: max_tokens covers that head start, so no request finishes while steps are timed
    (the bench raises if one does: its steps would run fewer rows than it reports)."""
    result = bench_decode_step.main([
        "--base-model", "random:tiny-gqa", "--device", "cpu", "--dtype", "float32",
        "--batch", "8", "--context", "16", "--warmup", "1", "--iters", "3",
        "--mixed-prompt", "12", "--cache", str(cache), "--bandwidth", "1e10",
        "--engine-param", "max_batched_tokens=16"])
    assert result["lora"]["batch"] == 8 and result["lora"]["context_len_mean"] > 16


def test_concurrent_kernel_time_is_the_overlap_of_their_spans():
    # 0-10 and 5-12 overlap 5; 20-30 alone; 21-22 inside it: 1 more
    assert bench_decode_step.concurrent_us([(20, 30), (0, 10), (5, 12), (21, 22)]) == 6
    assert bench_decode_step.concurrent_us([(0, 1), (1, 2)]) == 0
    assert bench_decode_step.concurrent_us([]) == 0


def test_a_slora_variant_names_its_changes():
    from benchmarks.harness_systems import parse_slora_variant

    assert parse_slora_variant("fast:piecewise_max_tokens=1024,split_k_shrink=false") == (
        "fast", {"piecewise_max_tokens": 1024, "split_k_shrink": False})
    for bad in ("nochanges", ":x=1", "name:"):
        with pytest.raises(ValueError, match="expected NAME:KEY=VALUE"):
            parse_slora_variant(bad)
    with pytest.raises(ValueError, match="KEY one of"):
        parse_slora_variant("typo:piecewise_max_tokenz=1")
