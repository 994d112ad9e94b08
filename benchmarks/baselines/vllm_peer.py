"""Baseline (e): vLLM on the harness's trace, each mode in its own vLLM process.

vLLM needs its own interpreter environment (numpy 2; on the H200 ``/tmp/vllm-site`` first on
PYTHONPATH and the image's python3, not the engine's venv), so the harness never imports it:
for each run it writes a job file (the trace, its token-id prompts, vLLM's engine arguments, the
adapters) and starts ``benchmarks.baselines.vllm_replay`` with ``--vllm-python`` and
``--vllm-pythonpath``, under ``--vllm-timeout``; the row it writes joins the harness's report.

Runs: ``lora`` once per ``--vllm-max-loras`` value (each value's row is reported, the best by
req/s carries ``vllm_best``) and ``base`` (the same requests without adapters). Settings, as a
user tuning vLLM for this trace would set them and as the engine is set:
- ``max_num_seqs`` and ``max_num_batched_tokens``: the engine's (its EngineConfig after the
  harness's flags and ``--engine-param``);
- ``max_lora_rank``: the adapter set's largest rank rounded up to a rank vLLM allows;
- ``max_cpu_loras`` = n (every adapter stays in host memory once read), ``max_loras`` (adapters
  on the GPU = most distinct adapters in one batch) at most n; one ``LoRARequest`` per adapter
  with a stable id (its index in the set + 1); LoRA on the adapters' modules (q/k/v/o);
- prefix caching off (the prompts share nothing; the engine has none), CUDA graphs on
  (``enforce_eager=False``), FlashAttention, dummy (random) weights of the setting's shape.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..prompts import token_prompts
from ..workload import LORA_TARGETS, Workload, get_setting
from .vllm_replay import VLLM_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
MODES = ("lora", "base")


@dataclass(frozen=True)
class VllmRun:
    """One vLLM process: a mode and, for ``lora``, its GPU adapter slots."""

    mode: str
    max_loras: int | None = None

    @property
    def tag(self) -> str:
        return self.mode if self.max_loras is None else f"{self.mode}-ml{self.max_loras}"


def lora_rank_slot(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds adapters of ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"adapter rank {rank} exceeds vLLM's largest max_lora_rank "
                     f"{VLLM_LORA_RANKS[-1]}")


def max_loras_values(spec: str, n: int, max_num_seqs: int) -> list[int]:
    """``--vllm-max-loras``: comma list of integers or ``n`` (= min(n, max_num_seqs)); each value
    is capped at n (vLLM requires max_loras <= max_cpu_loras = n); duplicates dropped."""
    out: list[int] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token == "n":
            value = min(n, max_num_seqs)
        else:
            try:
                value = int(token)
            except ValueError:
                raise ValueError(f"--vllm-max-loras: {token!r} is neither an integer nor 'n'") from None
            if value < 1:
                raise ValueError(f"--vllm-max-loras: values must be >= 1, got {value}")
        value = min(value, n)
        if value not in out:
            out.append(value)
    if not out:
        raise ValueError(f"--vllm-max-loras: no value in {spec!r}")
    return out


def planned_runs(args: argparse.Namespace, n: int, max_num_seqs: int) -> list[VllmRun]:
    modes = [m.strip() for m in args.vllm_modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"--vllm-modes: {args.vllm_modes!r}; choose from {','.join(MODES)}")
    runs = []
    for mode in modes:
        if mode == "base":
            runs.append(VllmRun("base"))
        else:
            runs += [VllmRun("lora", m) for m in max_loras_values(args.vllm_max_loras, n, max_num_seqs)]
    return runs


def parse_engine_args(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` -> AsyncEngineArgs keywords; VALUE is read as JSON when it parses."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--vllm-engine-arg {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def engine_args(args: argparse.Namespace, run: VllmRun, *, model: str, load_format: str,
                n: int, max_rank: int, max_num_seqs: int, max_batched_tokens: int) -> dict[str, Any]:
    """AsyncEngineArgs keywords of ``run`` (see the module docstring for why each is set)."""
    kw: dict[str, Any] = dict(
        model=model, load_format=load_format, skip_tokenizer_init=True, dtype=args.dtype, seed=0,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched_tokens,
        enable_prefix_caching=False, enforce_eager=False,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        attention_backend="FLASH_ATTN")
    if run.mode == "lora":
        kw.update(enable_lora=True, max_lora_rank=lora_rank_slot(max_rank),
                  max_loras=run.max_loras, max_cpu_loras=n,
                  lora_target_modules=list(LORA_TARGETS))
    kw.update(parse_engine_args(args.vllm_engine_arg))
    return kw


def write_model_dir(cache: Path, base_model: str, dtype: str) -> tuple[str, str]:
    """(model, load_format): a Hugging Face directory as given, or for ``random:<shape>`` a
    directory with only the shape's config.json (vLLM fills random weights: ``dummy``)."""
    if not base_model.startswith("random:"):
        return base_model, "auto"
    from slora_backend.model_loader import random_config

    shape = base_model.removeprefix("random:")
    config = random_config(shape).to_dict()
    config.update(architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype=dtype)
    out = Path(cache) / f"vllm-model-{shape}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return str(out), "dummy"


def child_env(args: argparse.Namespace) -> dict[str, str]:
    """The vLLM process's environment: ours without this venv, PYTHONPATH = --vllm-pythonpath
    then the repository (for ``benchmarks``), vLLM's offline settings, then --vllm-env."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    if sys.prefix != sys.base_prefix:  # in a venv: its bin must not shadow vLLM's python3
        venv_bin = os.path.join(sys.prefix, "bin")
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                      if os.path.abspath(p) != os.path.abspath(venv_bin))
    paths = [p for p in (args.vllm_pythonpath or "").split(os.pathsep) if p] + [str(REPO_ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(VLLM_ENV)
    for item in args.vllm_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--vllm-env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def run_process(args: argparse.Namespace, job: dict[str, Any], stem: Path, timeout_s: float,
                log=print) -> dict[str, Any]:
    """Run one job in vLLM's process; its row, or a row with ``error`` (and the log's tail)."""
    job_file, out_file, log_file = (stem.parent / (stem.name + s)
                                    for s in (".job.json", ".out.json", ".log"))
    job_file.write_text(json.dumps(job))
    out_file.unlink(missing_ok=True)
    cmd = [args.vllm_python, "-m", "benchmarks.baselines.vllm_replay", str(job_file), str(out_file)]
    t0 = time.perf_counter()
    with open(log_file, "w") as sink:
        # Its own session: a timeout ends vLLM's engine-core process too (same process group).
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env(args), stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
            _stop_group(proc)
    wall = round(time.perf_counter() - t0, 1)
    tail = log_file.read_text(errors="replace")[-3000:]
    if rc == 0 and out_file.is_file():
        result = json.loads(out_file.read_text())
        result["process_s"] = wall
        return result
    why = f"timed out after {timeout_s:g} s" if rc is None else f"exit status {rc}"
    log(f"  vLLM {job['mode']} failed ({why}); log {log_file}:\n{tail[-1500:]}")
    return {"error": f"vLLM process {why}", "note": f"failed: vLLM process {why}",
            "log_tail": tail, "process_s": wall}


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run(args: argparse.Namespace, workload: Workload, base_model: str,
        engine_kwargs: dict[str, Any], adapter_root: Path | None, log=print) -> list[dict[str, Any]]:
    """Every planned vLLM run of ``workload``: one result per run, the best lora row marked."""
    from slora_backend import EngineConfig

    from ..adapter_sets import model_spec

    c = workload.config
    max_num_seqs = engine_kwargs.get("max_num_seqs") or EngineConfig.max_num_seqs
    max_batched_tokens = engine_kwargs.get("max_batched_tokens") or EngineConfig.max_batched_tokens
    runs = planned_runs(args, c.num_adapters, max_num_seqs)
    model, load_format = write_model_dir(Path(args.cache), base_model, args.dtype)
    prompts = token_prompts(workload.requests, model_spec(base_model).vocab_size, args.seed)
    by_rank: dict[int, str] = {}
    for a in workload.adapters:
        by_rank.setdefault(a.rank, a.name)
    log_dir = Path(args.vllm_log_dir or Path(args.cache) / "vllm-runs")
    log_dir.mkdir(parents=True, exist_ok=True)
    timeout_s = args.vllm_timeout or (args.time_limit or c.duration_s) + 300.0
    results = []
    for run_ in runs:
        lora = run_.mode == "lora"
        if lora and adapter_root is None:
            raise ValueError("baseline e's lora mode needs the adapter set (adapter_root)")
        kw = engine_args(args, run_, model=model, load_format=load_format, n=c.num_adapters,
                         max_rank=max(get_setting(c.setting).ranks), max_num_seqs=max_num_seqs,
                         max_batched_tokens=max_batched_tokens)
        job = {
            "mode": run_.mode, "engine_args": kw,
            "loras": [[a.name, i + 1, str(adapter_root / a.name)]
                      for i, a in enumerate(workload.adapters)] if lora else [],
            "warm_adapters": [None, *by_rank.values()] if lora else [None],
            "requests": [[r.arrival_s, r.adapter if lora else None, r.output_len]
                         for r in workload.requests],
            "prompts": prompts, "time_limit_s": args.time_limit, "slo_s": args.slo,
        }
        label = (f"(e) vLLM + LoRA, max_loras {run_.max_loras}" if lora
                 else "(e) vLLM, base model, no adapters")
        log(f"[{c.setting} n={c.num_adapters}] {label} (limit {args.time_limit or 'none'} s, "
            f"process timeout {timeout_s:g} s)")
        stem = log_dir / f"{c.setting}-n{c.num_adapters}-a{c.alpha:g}-r{c.rate:g}-{run_.tag}"
        result = run_process(args, job, stem, timeout_s, log)
        result.update(system=f"vllm_{run_.mode}", label=label, vllm_engine_args=kw,
                      vllm_max_loras=run_.max_loras)
        result["replay_note"] = result.get("note")
        results.append(result)
    finish_rows(results)
    return results


def finish_rows(results: list[dict[str, Any]]) -> None:
    """Mark the best lora row of ``results`` (rows of one trace, possibly from several harness
    runs) and write each row's note: vLLM's settings, then what the replay said."""
    mark_best(results)
    for r in results:
        r["note"] = "; ".join(p for p in (settings_note(r), r.get("replay_note")) if p)


def mark_best(results: list[dict[str, Any]]) -> None:
    """``vllm_best``: True on the lora row of highest req/s, False on the other lora rows."""
    lora = [r for r in results if r["system"] == "vllm_lora"]
    ok = [r for r in lora if "error" not in r and r.get("throughput_req_s") is not None]
    best = max(ok, key=lambda r: (r["throughput_req_s"], r.get("throughput_steady_req_s") or 0),
               default=None)
    for r in lora:
        r["vllm_best"] = r is best


def settings_note(r: dict[str, Any]) -> str:
    """vLLM's settings for the markdown row: as vLLM read them back, else as they were passed."""
    kw, seen = r["vllm_engine_args"], r.get("vllm") or {}
    lora = seen.get("lora") or {}
    parts = [f"vLLM {seen.get('version', '?')}",
             f"max_num_seqs {seen.get('max_num_seqs', kw['max_num_seqs'])}",
             f"max_num_batched_tokens {seen.get('max_num_batched_tokens', kw['max_num_batched_tokens'])}"]
    if r["system"] == "vllm_lora":
        parts += [f"max_loras {lora.get('max_loras', kw['max_loras'])}"
                  + (" (best)" if r.get("vllm_best") else ""),
                  f"max_cpu_loras {lora.get('max_cpu_loras', kw['max_cpu_loras'])}",
                  f"max_lora_rank {lora.get('max_lora_rank', kw['max_lora_rank'])}"]
    parts.append("graphs " + ("off" if kw.get("enforce_eager") else
                              str(seen.get("cudagraph_mode", "on")).removeprefix("CUDAGraphMode.")))
    parts.append("prefix caching " + ("on" if kw.get("enable_prefix_caching") else "off"))
    return ", ".join(parts)


def comparisons(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios of the vLLM targets: S-LoRA over the best vLLM + LoRA row, (b) over vLLM base
    (throughput: > 1 is better), and S-LoRA's first-token latency over vLLM's (< 1 is better)."""
    out: dict[str, Any] = {}
    for mine, theirs, key in (("slora", "vllm_lora", "slora_over_vllm_lora"),
                              ("no_lora", "vllm_base", "no_lora_over_vllm_base")):
        a, b = systems.get(mine, {}), systems.get(theirs, {})
        for metric, suffix in (("throughput_req_s", ""), ("throughput_steady_req_s", "_steady")):
            if a.get(metric) and b.get(metric):
                out[key + suffix] = round(a[metric] / b[metric], 3)
        for q in ("p50", "p90", "sent_p50", "sent_p90"):  # (sent: None where never reached)
            if a.get(f"ttft_{q}_s") is not None and b.get(f"ttft_{q}_s"):
                out[f"{mine}_ttft_{q}_over_{theirs}"] = round(a[f"ttft_{q}_s"] / b[f"ttft_{q}_s"], 3)
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("baseline e: vLLM (its own process and environment)")
    g.add_argument("--vllm-python", default=sys.executable,
                   help="interpreter of vLLM's process (on the H200: the image's python3, taken "
                        "before sourcing .device/setup.sh)")
    g.add_argument("--vllm-pythonpath", default="",
                   help="PYTHONPATH of vLLM's process, e.g. /tmp/vllm-site (the repository is "
                        "appended); ours is not inherited")
    g.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment of vLLM's process")
    g.add_argument("--vllm-modes", default="lora,base", help="comma list of lora, base")
    g.add_argument("--vllm-max-loras", default="32,n",
                   help="max_loras values to run (one process and row each; 'n' = "
                        "min(n, max_num_seqs)); the best row by req/s is marked")
    g.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--vllm-engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra AsyncEngineArgs keyword (VALUE as JSON when it parses)")
    g.add_argument("--vllm-timeout", type=float, default=None,
                   help="seconds per vLLM process (engine build, warm-up, replay); default "
                        "time limit (else trace length) + 300")
    g.add_argument("--vllm-log-dir", type=Path, default=None,
                   help="job files and logs of the vLLM processes (default <cache>/vllm-runs)")
