"""The issue-5 matrix, in parts that each fit one GPU call (< 10 minutes of wall time).

Every run replays the same kind of trace - the paper's generator at a rate ``--rate`` meant to
saturate the engine - for at most ``--time-limit`` seconds (the trace is longer than that, so the
engine is never idle and each run costs a known time). Throughput is completed requests over the
run (the paper's figure) and over its last two thirds (``steady``: the capacity without the
ramp-up). Parts:

- ``s1``: S1 (7B, rank 8) at n = 2000 with baselines (b) no adapters and (a) transformers+PEFT,
  the decode-step bandwidth check (batch 64 over 64 adapters), then n = 2000/1000/100/5 at
  alpha = 1 and 0.3.
- ``s2``: S2 (7B, ranks 64/32/16/8) at the largest n that fits the disk (up to 1000) with the
  paper's ablations (c) bmm and (d) no unified memory, the same trace through tritonserver
  (gRPC streaming; needs ``source .device/setup.sh``), then n = 1000/100/5 at alpha 1 and 0.3.
- ``triton``: S1 n = 2000 alpha 1 in-process and through tritonserver.
- ``vllm_s1_n5``, ``vllm_s1_n100``, ``vllm_s1_n2000``, ``vllm_s2_n100``: one trace each with (b)
  and (e) vLLM (its lora runs and base; pass vLLM's interpreter and site with
  ``--harness-arg=--vllm-python=...`` and ``--harness-arg=--vllm-pythonpath=...``). S-LoRA, (b)
  alone: ``--harness-arg=--vllm-modes=...`` narrows (e) to fit a call.
- ``all``: s1 then s2 (needs about two calls' time).
- ``smoke``: a tiny CPU version of every kind of job (checks the runner itself).

Jobs run in priority order; one that would not finish inside ``--budget-s`` is skipped and listed
as such. Results are rewritten after every job: ``suite.json`` (every row with its parameters,
the machine and versions, the comparisons with the issue's targets) and ``suite.md`` (the table).

Usage: python -m benchmarks.run_slora_suite --part s1 --out $OUT [--rate 60] [--time-limit 15]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import harness, harness_run, harness_systems, run_metadata
from .adapter_sets import adapter_bytes, ensure_adapter_set, fitting_prefix, model_spec, set_dir
from .workload import adapter_specs, generate, get_setting

GIB = 2**30


@dataclass(frozen=True)
class Job:
    setting: str
    n: int
    alpha: float
    baselines: str = ""
    triton: bool = False
    decode: bool = False  # the decode-step bandwidth check instead of a replay


def _matrix(setting: str, ns: tuple[int, ...], first: Job) -> list[Job]:
    rest = [Job(setting, n, a) for n in ns for a in (1.0, 0.3)]
    return [first, *[j for j in rest if (j.n, j.alpha) != (first.n, first.alpha)]]


PARTS: dict[str, list[Job]] = {
    "s1": [Job("S1", 2000, 1.0, baselines="b,a"), Job("S1", 64, 1.0, decode=True),
           *_matrix("S1", (2000, 1000, 100, 5), Job("S1", 2000, 1.0))[1:]],
    "s2": _matrix("S2", (1000, 100, 5), Job("S2", 1000, 1.0, baselines="c,d", triton=True)),
    # S2's rows without the slow ablations (c, d and Triton already have rows of their own).
    "s2_matrix": [Job("S2", n, a) for n in (1000, 100, 5) for a in (1.0, 0.3)],
    "triton": [Job("S1", 2000, 1.0, triton=True)],
    **{f"vllm_{s.lower()}_n{n}": [Job(s, n, 1.0, baselines="b,e")]
       for s, n in (("S1", 5), ("S1", 100), ("S1", 2000), ("S2", 100))},
    "smoke": [Job("S1", 20, 1.0, baselines="a,b,c,d"), Job("S1", 4, 1.0, decode=True),
              Job("S2", 12, 0.3)],
}
PARTS["all"] = PARTS["s1"] + PARTS["s2"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=sorted(PARTS), required=True)
    ap.add_argument("--out", type=Path, required=True, help="suite.json, suite.md, suite.log")
    ap.add_argument("--rate", type=float, default=60.0,
                    help="offered req/s; it saturates the engine when 'queue avg' stays > 0")
    ap.add_argument("--duration", type=float, default=None,
                    help="trace length in s (default: time limit + 10, never exhausted)")
    ap.add_argument("--time-limit", type=float, default=15.0, help="seconds per replay")
    ap.add_argument("--slow-baseline-limit", type=float, default=45.0,
                    help="seconds for (a) PEFT and (c) bmm")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="wall budget of the whole part; jobs that would overrun are skipped")
    ap.add_argument("--cache", default="/tmp/slora-bench-adapters", help="adapter sets")
    ap.add_argument("--disk-margin-gib", type=float, default=6.0,
                    help="free disk to leave when writing adapter sets")
    ap.add_argument("--max-adapter-gib", type=float, default=32.0,
                    help="largest adapter set to write (S1 at n=2000 is 31.3 GiB; S2 at n=1000 "
                         "would be 58.6 GiB, so S2 stops at ~540 adapters)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--input-range", type=int, nargs=2, default=[8, 512], metavar=("LO", "HI"))
    ap.add_argument("--output-range", type=int, nargs=2, default=[8, 512], metavar=("LO", "HI"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--base-model", default=None, help="default random:<setting's shape>")
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--decode-context", type=int, default=512)
    ap.add_argument("--vllm-overhead-s", type=float, default=150.0,
                    help="per vLLM process: start, engine build (compile, graphs), warm-up")
    ap.add_argument("--harness-arg", action="append", default=[],
                    help="extra harness flag, e.g. --harness-arg=--max-num-seqs=256")
    return ap


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {"decode_step": [], "skipped": [], "errors": [],
                                      "adapter_sets": {}}
        self.overhead_s = 30.0  # per-replay set-up (engine build, warm-up); learnt as we go
        args.out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(args.out / "suite.log", "a")

    def log(self, *parts: Any) -> None:
        line = f"[{time.perf_counter() - self.t0:6.0f}s] " + " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    # ---- adapters ------------------------------------------------------------------------------

    def adapter_root(self, setting: str, n: int) -> tuple[Path, int]:
        """The setting's adapter set, at least ``n`` adapters or as many as the disk allows."""
        a = self.args
        base = a.base_model or f"random:{get_setting(setting).base_shape}"
        spec = model_spec(base)
        specs = adapter_specs(setting, n)
        cache = Path(a.cache)
        cache.mkdir(parents=True, exist_ok=True)
        present = [(set_dir(cache, setting, base) / s.name).is_dir() for s in specs]
        # Adapters already written cost no disk; only the missing ones must leave the margin.
        room = shutil.disk_usage(cache).free - a.disk_margin_gib * GIB
        fits = fitting_prefix(specs, spec, int(a.max_adapter_gib * GIB), int(room), present)
        t = time.perf_counter()
        root = ensure_adapter_set(cache, setting, max(fits, 1), base=base, log=self.log)
        info = self.extra["adapter_sets"].setdefault(f"{setting} {base}", {})
        info.update(path=str(root), adapters=max(fits, info.get("adapters", 0)),
                    gib=round(sum(adapter_bytes(spec, s.rank) for s in specs[:fits]) / GIB, 1))
        info.setdefault("write_s", round(time.perf_counter() - t, 1))
        if fits < n:
            self.log(f"{setting}: only {fits} of {n} adapters fit the disk ({room / GIB:.0f} GiB "
                     f"free beyond the margin) and the {a.max_adapter_gib:.0f} GiB set size; "
                     f"runs asking for more use {fits}")
        return root, fits

    # ---- jobs ----------------------------------------------------------------------------------

    def harness_args(self, job: Job, n: int) -> argparse.Namespace:
        a = self.args
        duration = a.duration or a.time_limit + 10.0
        argv = ["--setting", job.setting, "--n", str(n), "--alpha", str(job.alpha),
                "--rate", str(a.rate), "--cv", "1", "--duration", str(duration),
                "--seed", str(a.seed), "--time-limit", str(a.time_limit),
                "--input-range", *map(str, a.input_range),
                "--output-range", *map(str, a.output_range),
                "--slow-baseline-limit", str(a.slow_baseline_limit), "--cache", a.cache,
                "--device", a.device, "--dtype", a.dtype, "--baselines", job.baselines,
                "--triton-log", str(a.out / "tritonserver.log"), *a.harness_arg]
        if a.base_model:
            argv += ["--base-model", a.base_model]
        if job.triton:
            argv.append("--triton-serve")
        return harness.normalize(harness.build_parser().parse_args(argv))

    def estimate(self, job: Job) -> float:
        a = self.args
        if job.decode:
            return 60.0
        cost = a.time_limit + self.overhead_s
        for b in job.baselines.split(","):
            if b in ("a", "c"):
                cost += a.slow_baseline_limit + self.overhead_s
            elif b in ("b", "d"):
                cost += a.time_limit + self.overhead_s
            elif b == "e":
                cost += self.vllm_runs(job) * (a.time_limit + a.vllm_overhead_s)
        if job.triton:
            cost += a.time_limit + 120.0  # server start, engine build and kernel compile in it
        return cost

    def vllm_runs(self, job: Job) -> int:
        from slora_backend import EngineConfig

        from .baselines import vllm_peer

        args = self.harness_args(job, job.n)
        return len(vllm_peer.planned_runs(args, job.n, args.max_num_seqs or EngineConfig.max_num_seqs))

    def run_job(self, job: Job) -> None:
        root, n = self.adapter_root(job.setting, job.n)
        if job.decode:
            self.run_decode(job, root)
            return
        args = self.harness_args(job, n)
        workload = generate(harness_run.workload_config(args))
        t = time.perf_counter()
        rows = harness_systems.run_systems(args, workload, adapter_root=root, log=self.log)
        replays = len(rows)
        busy = sum(r.get("wall_s", 0) for r in rows)
        self.overhead_s = max(10.0, (time.perf_counter() - t - busy) / max(replays, 1))
        for r in rows:
            r["n_requested"] = job.n
            if n < job.n:
                r["note"] = (r.get("note", "") + f"; n reduced from {job.n} to {n} to fit the "
                             "disk").lstrip("; ")
        self.rows += rows

    def run_decode(self, job: Job, root: Path) -> None:
        from . import bench_decode_step

        a = self.args
        argv = ["--device", a.device, "--dtype", a.dtype, "--batch", str(job.n),
                "--context", str(a.decode_context if job.n >= 64 else 16),
                "--setting", job.setting, "--cache", a.cache]
        if a.base_model:
            argv += ["--base-model", a.base_model]
        if a.device == "cpu":
            argv += ["--warmup", "1", "--iters", "3"]
        else:
            argv += ["--profile", "5"]
        result = bench_decode_step.run(bench_decode_step.build_parser().parse_args(argv))
        self.extra["decode_step"].append(result)
        lora = result["lora"]
        self.log(f"decode step, batch {lora['batch']} over {lora['distinct_adapters']} adapters "
                 f"at context {lora['context_len_mean']}: {lora['step_ms_median']} ms vs bound "
                 f"{lora['bound_ms']} ms -> {lora['ratio_to_bound']}x (base model: "
                 f"{result['base']['step_ms_median']} ms, {result['base']['ratio_to_bound']}x)")

    def run(self) -> dict[str, Any]:
        jobs = PARTS[self.args.part]
        self.log(f"part {self.args.part}: {len(jobs)} jobs, budget {self.args.budget_s:.0f} s")
        for job in jobs:
            need = self.estimate(job)
            if need > self.left():
                self.log(f"skip {job} (needs ~{need:.0f} s, {self.left():.0f} s left)")
                self.extra["skipped"].append({**job.__dict__, "estimated_s": round(need)})
                continue
            self.log(f"job {job} (~{need:.0f} s)")
            try:
                self.run_job(job)
            except Exception as e:  # one broken job must not lose the others' results
                self.log(f"job {job} failed: {e!r}")
                self.extra["errors"].append({**job.__dict__, "error": repr(e),
                                             "traceback": traceback.format_exc()[-4000:]})
            self.write()
        self.log(f"done in {time.perf_counter() - self.t0:.0f} s")
        return self.write()

    def write(self) -> dict[str, Any]:
        report = {
            "meta": run_metadata.run_metadata(),
            "suite_args": {k: (str(v) if isinstance(v, Path) else v)
                           for k, v in vars(self.args).items()},
            "results": self.rows,
            "comparisons": harness_run.comparisons(self.rows),
            **self.extra,
            "elapsed_s": round(time.perf_counter() - self.t0, 1),
        }
        (self.args.out / "suite.json").write_text(json.dumps(report, indent=1, default=str))
        md = [f"S-LoRA suite part `{self.args.part}`, {report['meta']['date']}, "
              f"{report['meta'].get('gpu', 'cpu')}: `{report['meta']['command']}`", "",
              harness_run.markdown_table(self.rows), ""]
        for d in self.extra["decode_step"]:
            lo, ba = d["lora"], d["base"]
            md.append(f"Decode step at batch {lo['batch']} over {lo['distinct_adapters']} "
                      f"adapters (context {lo['context_len_mean']}): {lo['step_ms_median']} ms, "
                      f"bound {lo['bound_ms']} ms ({lo['bytes_total'] / 1e9:.2f} GB at "
                      f"{d['bandwidth_B_s'] / 1e12:.2f} TB/s) = {lo['ratio_to_bound']}x; base "
                      f"model {ba['step_ms_median']} ms = {ba['ratio_to_bound']}x.")
        if report["comparisons"]:
            md += ["", "```", json.dumps(report["comparisons"], indent=1), "```"]
        if self.extra["skipped"] or self.extra["errors"]:
            md += ["", f"Skipped: {self.extra['skipped']}",
                   f"Errors: {[e['error'] for e in self.extra['errors']]}"]
        (self.args.out / "suite.md").write_text("\n".join(md) + "\n")
        return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    return Suite(args).run()


if __name__ == "__main__":
    harness.exit_on_sigterm()
    sys.exit(0 if not main()["errors"] else 1)
