"""Baseline (e) through the harness with a stand-in vLLM (tests/benchmarks/fake_vllm): the
subprocess, its environment, the settings vLLM receives, the max_loras sweep, the time-limit cut,
the process timeout and the rows merged into the report beside S-LoRA's and (b)'s."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import harness
from benchmarks.baselines import vllm_peer
from slora_backend.model_loader import RANDOM_SHAPES

FAKE = Path(__file__).parent / "fake_vllm"
REPO = Path(__file__).resolve().parent.parent.parent
TINY = ["--base-model", "random:tiny-gqa", "--device", "cpu", "--dtype", "float32",
        "--setting", "S2", "--n", "20", "--alpha", "0.5", "--rate", "8", "--duration", "2",
        "--input-range", "8", "24", "--output-range", "2", "12", "--seed", "3",
        "--vllm-python", sys.executable, "--vllm-pythonpath", str(FAKE)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-cache")


def run_harness(argv: list[str], record: Path) -> dict:
    args = harness.normalize(harness.build_parser().parse_args(
        [*TINY, *argv, "--vllm-env", f"FAKE_VLLM_RECORD={record}"]))
    return harness.run(args, log=lambda *_: None)


@pytest.fixture(scope="module")
def report(cache, tmp_path_factory):
    record = tmp_path_factory.mktemp("vllm-record") / "engines.jsonl"
    data = run_harness(["--cache", str(cache), "--baselines", "b,e", "--vllm-max-loras", "2,n",
                        "--max-num-seqs", "8", "--max-batched-tokens", "96"], record)
    engines = [json.loads(line) for line in record.read_text().splitlines()]
    return data, engines


def test_vllm_rows_join_the_report(report):
    data, _ = report
    systems = [r["system"] for r in data["results"]]
    assert systems == ["slora", "no_lora", "vllm_lora", "vllm_lora", "vllm_base"]
    tokens = data["workload"]["summary"]["total_output_tokens"]
    for r in data["results"]:
        assert "error" not in r, r.get("note")
        assert r["requests_completed"] == r["requests_planned"] == 16, r["system"]
        assert r["finish_reasons"] == {"length": 16} and r["output_tokens"] == tokens
        assert r["ttft_p50_s"] <= r["ttft_p90_s"] <= r["ttft_p99_s"]
        assert (r["setting"], r["n"], r["alpha"]) == ("S2", 20, 0.5)
    vllm = [r for r in data["results"] if r["system"].startswith("vllm")]
    assert [r["vllm_max_loras"] for r in vllm] == [2, 8, None]  # 'n' = min(20, max_num_seqs 8)
    assert all(r["vllm"]["version"] == "0.0.0+fake" for r in vllm)


def test_vllm_got_the_engines_settings(report):
    data, engines = report
    slora = data["results"][0]["engine_config"]
    assert [e["engine_args"].get("max_loras") for e in engines] == [2, 8, None]
    for e in engines:
        kw = e["engine_args"]
        assert kw["max_num_seqs"] == slora["max_num_seqs"] == 8
        assert kw["max_num_batched_tokens"] == slora["max_batched_tokens"] == 96
        assert kw["enable_prefix_caching"] is False and kw["enforce_eager"] is False
        assert kw["load_format"] == "dummy" and kw["skip_tokenizer_init"] is True
        config = json.loads((Path(kw["model"]) / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
        assert {k: config[k] for k in RANDOM_SHAPES["tiny-gqa"]} == RANDOM_SHAPES["tiny-gqa"]
        assert e["usage_context"] == "OPENAI_API_SERVER"
        assert e["env"]["PYTHONPATH"].split(":") == [str(FAKE), str(REPO)]
        assert e["env"]["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
        assert e["env"]["VLLM_USE_FLASHINFER_SAMPLER"] == "0" and e["env"]["VIRTUAL_ENV"] is None
        timed = [q for q in e["requests"] if not q["request_id"].startswith("warm")]
        assert len(timed) == 16
        for q in e["requests"]:
            assert q["temperature"] == 0 and q["ignore_eos"]
            assert q["min_tokens"] == q["max_tokens"]
    lora_runs, base = engines[:2], engines[2]
    for e in lora_runs:
        kw = e["engine_args"]
        # S2's ranks are 64/32/16/8; every adapter of the set stays in host memory
        assert kw["enable_lora"] and kw["max_lora_rank"] == 64 and kw["max_cpu_loras"] == 20
        assert kw["lora_target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert 1 <= e["max_running_loras"] <= kw["max_loras"]
    ids = {}
    for e in lora_runs:
        for q in e["requests"]:
            if q["lora"] is not None:
                name, lora_id, path = q["lora"]
                assert ids.setdefault(name, lora_id) == lora_id  # stable ids across runs
                assert Path(path).name == name and (Path(path) / "adapter_config.json").is_file()
    assert sorted(ids.values()) == [int(n.split("-")[1]) + 1 for n in sorted(ids)]
    trace_adapters = [q["lora"] for q in lora_runs[0]["requests"]
                      if not q["request_id"].startswith("warm")]
    assert all(a is not None for a in trace_adapters)
    assert not base["engine_args"].get("enable_lora")
    assert all(q["lora"] is None for q in base["requests"])


def test_best_max_loras_is_marked_and_compared(report):
    data, _ = report
    lora = [r for r in data["results"] if r["system"] == "vllm_lora"]
    assert sorted(r["vllm_best"] for r in lora) == [False, True]
    best = next(r for r in lora if r["vllm_best"])
    assert best["throughput_req_s"] == max(r["throughput_req_s"] for r in lora)
    assert "(best)" in best["note"] and "max_cpu_loras 20" in best["note"]
    assert "max_lora_rank 64" in best["note"] and "max_num_batched_tokens 96" in best["note"]
    assert "prefix caching off" in best["note"]
    base = data["results"][-1]
    assert "max_loras" not in base["note"] and "max_num_seqs 8" in base["note"]
    (c,) = data["comparisons"].values()
    slora, no_lora = data["results"][0], data["results"][1]
    assert c["slora_over_vllm_lora"] == round(slora["throughput_req_s"] / best["throughput_req_s"], 3)
    assert c["no_lora_over_vllm_base"] == round(
        no_lora["throughput_req_s"] / base["throughput_req_s"], 3)
    assert c["slora_ttft_p90_over_vllm_lora"] > 0
    lines = data["markdown"].splitlines()
    assert len(lines) == 2 + 5 and "| p50 | p90 | p99 |" in lines[0]
    assert f"| {best['ttft_p90_s']:.3g} |" in lines[2 + 2 + lora.index(best)]


def test_time_limit_cuts_the_vllm_replay(cache, tmp_path):
    data = run_harness(["--cache", str(cache), "--no-slora", "--baselines", "e",
                        "--vllm-modes", "base", "--duration", "4", "--time-limit", "1.0",
                        "--vllm-env", "FAKE_VLLM_TOKEN_S=0.1"], tmp_path / "r.jsonl")
    (row,) = data["results"]
    assert row["system"] == "vllm_base" and row["truncated"] and "1 s limit" in row["note"]
    assert row["requests_planned"] < row["requests_in_trace"]
    assert row["finish_reasons"].get("time_limit", 0) >= 1
    assert row["wall_s"] < 2.5


def test_a_hung_vllm_process_is_stopped_at_its_timeout(cache, tmp_path):
    data = run_harness(["--cache", str(cache), "--no-slora", "--baselines", "e",
                        "--vllm-modes", "base", "--vllm-timeout", "3",
                        "--vllm-log-dir", str(tmp_path), "--vllm-env", "FAKE_VLLM_BUILD_S=120"],
                       tmp_path / "r.jsonl")
    (row,) = data["results"]
    assert row["error"] == "vLLM process timed out after 3 s" and row["process_s"] < 30
    assert row["system"] == "vllm_base" and "vllm_engine_args" in row
    assert list(tmp_path.glob("*-base.job.json")) and list(tmp_path.glob("*-base.log"))


def test_rank_slots_and_max_loras_values():
    assert [vllm_peer.lora_rank_slot(r) for r in (1, 2, 8, 9, 64, 300, 512)] == [
        1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(ValueError, match="rank 600"):
        vllm_peer.lora_rank_slot(600)
    assert vllm_peer.max_loras_values("32,n", 5, 256) == [5]
    assert vllm_peer.max_loras_values("32,n", 100, 256) == [32, 100]
    assert vllm_peer.max_loras_values("32, n", 2000, 256) == [32, 256]
    for bad, message in (("x", "neither an integer"), ("0", ">= 1"), (",", "no value")):
        with pytest.raises(ValueError, match=message):
            vllm_peer.max_loras_values(bad, 10, 256)


def test_bad_vllm_flags_fail_before_any_replay():
    with pytest.raises(ValueError, match="--vllm-modes"):
        harness.normalize(harness.build_parser().parse_args(
            [*TINY, "--baselines", "e", "--vllm-modes", "lora,fast"]))
    with pytest.raises(ValueError, match="--vllm-max-loras"):
        harness.normalize(harness.build_parser().parse_args(
            [*TINY, "--baselines", "e", "--vllm-max-loras", "32,all"]))


def test_reports_of_one_trace_merge(report, tmp_path):
    from benchmarks import report_merge

    data, _ = report
    engine_part = {**data, "results": data["results"][:2]}
    vllm_part = {**data, "results": data["results"][2:]}
    for name, part in (("a.json", engine_part), ("b.json", vllm_part)):
        (tmp_path / name).write_text(json.dumps(part))
    merged = report_merge.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                                "--json", str(tmp_path / "m.json")])
    assert merged["comparisons"] == data["comparisons"]
    assert merged["markdown"] == data["markdown"]
    assert [m["systems"] for m in merged["merged_from"]] == [
        ["slora", "no_lora"], ["vllm_lora", "vllm_lora", "vllm_base"]]
    # one max_loras value per report: each was its report's best; merged, only the faster one is
    lora = data["results"][2:4]
    parts = [{**data, "results": [{**row, "vllm_best": True}]} for row in lora]
    merged = report_merge.merge(parts)
    assert [r["vllm_best"] for r in merged["results"]] == [r["vllm_best"] for r in lora]
    assert ["(best)" in r["note"] for r in merged["results"]] == [r["vllm_best"] for r in lora]
    other = json.loads(json.dumps(vllm_part))
    other["workload"]["config"]["num_adapters"] = 21
    with pytest.raises(ValueError, match="num_adapters differ"):
        report_merge.merge([engine_part, other])


def test_suite_part_runs_vllm_beside_the_engine(cache, tmp_path):
    from benchmarks import run_slora_suite

    report = run_slora_suite.main([
        "--part", "vllm_s1_n5", "--out", str(tmp_path), "--cache", str(cache), "--device", "cpu",
        "--dtype", "float32", "--base-model", "random:tiny-gqa", "--rate", "8",
        "--time-limit", "1.5", "--duration", "2", "--input-range", "8", "24",
        "--output-range", "2", "12", f"--harness-arg=--vllm-python={sys.executable}",
        f"--harness-arg=--vllm-pythonpath={FAKE}"])
    assert not report["errors"] and not report["skipped"]
    rows = report["results"]
    assert [r["system"] for r in rows] == ["slora", "no_lora", "vllm_lora", "vllm_base"]
    assert rows[2]["vllm_max_loras"] == 5 and rows[2]["vllm_best"] is True  # 32 and n cap at 5
    (c,) = report["comparisons"].values()
    assert "slora_over_vllm_lora" in c and "no_lora_over_vllm_base" in c
    assert "vllm_lora" in (tmp_path / "suite.md").read_text()
