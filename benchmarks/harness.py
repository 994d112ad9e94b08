"""The S-LoRA workload harness: one trace, this engine and its baselines in the same run.

Generates the paper's synthetic trace (``benchmarks.workload``), makes sure its adapters exist
on disk (``benchmarks.adapter_sets``), then replays the same requests into:

- ``slora``: this engine in-process (engine thread, requests sent at their arrival times);
- (a) ``peft``: transformers + PEFT as the paper ran it (``baselines/peft_serving.py``);
- (b) ``no_lora``: this engine, same requests on the base model (the upper bound);
- (c) ``bmm``: this engine with ``lora_ops="bmm"``;
- (d) ``no_unified``: this engine with adapters in a fixed partition (``adapter_pool_pages``);
- (e) ``vllm_lora`` / ``vllm_base``: vLLM in its own process and environment, with LoRA at each
  ``--vllm-max-loras`` value and on the base model (``baselines/vllm_peer.py``);
- ``slora_triton`` (``--triton-url`` or ``--triton-serve``): the same trace through tritonserver
  over gRPC streaming into the ``slora`` ensemble.

Reports throughput (req/s, output tok/s), first-token latency (avg/p50/p90/p99), SLO
attainment, pool occupancy (sampled), adapter hit ratio and peak GPU memory; writes JSON (every
parameter, the command line, date, machine and versions with the results) and a markdown table.

Usage: python -m benchmarks.harness --setting S1 --n 2000 --alpha 1 --rate 20 --cv 1
         --duration 60 --baselines a,b,c,d --device cuda --json out.json [--markdown out.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from .adapter_sets import DEFAULT_CACHE, ensure_adapter_set
from .baselines import vllm_peer
from .metrics import DEFAULT_SLO_S, markdown_header, markdown_row
from .step_profile import parse_step_kind
from .workload import Workload, WorkloadConfig, generate, get_setting

# The paper's S-LoRA and HF PEFT throughput on one A100-80GB (req/s, R = 10, alpha = 1, cv = 1).
PAPER_SLORA = {("S1", 5): 8.05, ("S1", 100): 7.99, ("S1", 1000): 7.64, ("S1", 2000): 7.61,
               ("S2", 5): 7.48, ("S2", 100): 7.29, ("S2", 1000): 6.69, ("S2", 2000): 6.71,
               ("S4", 2): 4.49, ("S4", 100): 4.28, ("S4", 1000): 3.96}
PAPER_PEFT = {("S1", 5): 0.88, ("S1", 100): 0.25, ("S2", 5): 0.74, ("S2", 100): 0.24,
              ("S4", 2): 0.54, ("S4", 100): 0.13}
BASELINES = ("a", "b", "c", "d", "e")


# ---- record keeping ------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def run_metadata() -> dict[str, Any]:
    """Date, command line, machine and versions: recorded with every result."""
    import torch

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    argv = list(sys.argv)
    script = Path(argv[0]) if argv else None
    if script is not None and script.suffix == ".py" and script.parent.name == "benchmarks":
        argv[0:1] = ["-m", f"benchmarks.{script.stem}"]  # run as a module
    meta: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *argv]),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "triton": _version("triton"),
        "tritonclient": _version("tritonclient"),
        "git_commit": commit,
        "git_dirty": dirty,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        meta["gpu"] = props.name
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["cuda"] = torch.version.cuda
    return meta


def parse_engine_params(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> EngineConfig keyword arguments, typed from the field defaults."""
    from slora_backend import EngineConfig

    known = {f.name: f for f in fields(EngineConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"engine param {item!r}: expected KEY=VALUE with KEY one of "
                             f"{sorted(known)}")
        default = known[key].default
        if raw.lower() in ("none", ""):
            out[key] = None
        elif isinstance(default, bool):
            out[key] = raw.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            out[key] = int(raw)
        elif isinstance(default, float):
            out[key] = float(raw)
        else:  # str or None default: try a number, else keep the string
            for cast in (int, float):
                try:
                    out[key] = cast(raw)
                    break
                except ValueError:
                    continue
            else:
                out[key] = raw
    return out


# ---- one run -------------------------------------------------------------------------------------


def engine_kwargs(args: argparse.Namespace, base_model: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"base_model": base_model, "device": args.device, "dtype": args.dtype}
    for key in ("pool_pages", "max_num_seqs", "max_batched_tokens"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    if args.early_abort:
        kwargs["slo_ttft_s"], kwargs["early_abort"] = args.slo, True
    if args.max_waiting is not None:
        kwargs["max_waiting"] = args.max_waiting
    kwargs.update(parse_engine_params(args.engine_param))
    return kwargs


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(setting=args.setting, num_adapters=args.n, alpha=args.alpha,
                          rate=args.rate, cv=args.cv, duration_s=args.duration,
                          input_range=tuple(args.input_range),
                          output_range=tuple(args.output_range), seed=args.seed)


def _row(workload: Workload, result: dict[str, Any]) -> dict[str, Any]:
    c = workload.config
    return {"setting": c.setting, "n": c.num_adapters, "alpha": c.alpha, "rate": c.rate,
            "cv": c.cv, "duration_s": c.duration_s, "seed": c.seed, **result}


def run_systems(args: argparse.Namespace, workload: Workload, *, adapter_root: Path | None,
                log=print) -> list[dict[str, Any]]:
    """Replay ``workload`` into the S-LoRA engine and each requested baseline; one row each.

    A system that fails gives a row with ``error`` (and the others still run): one missing
    feature or server must not cost the run's other results.
    """
    setting = get_setting(workload.config.setting)
    base_model = args.base_model or f"random:{setting.base_shape}"
    kwargs = engine_kwargs(args, base_model)
    c = workload.config
    tag = f"[{c.setting} n={c.num_adapters} alpha={c.alpha}]"
    jobs: list[tuple[str, Any]] = []
    for key in (["slora"] if not args.no_slora else []) + [
            b for b in ("b", "c", "d") if b in args.baselines]:
        jobs.append((key, lambda key=key: run_engine_variant(args, workload, key, kwargs,
                                                             base_model, adapter_root, tag, log)))
    if "a" in args.baselines:
        jobs.append(("peft", lambda: run_peft(args, workload, base_model, adapter_root, log)))
    if "e" in args.baselines:
        jobs.append(("vllm", lambda: vllm_peer.run(args, workload, base_model, kwargs,
                                                   adapter_root, log)))
    if args.triton_url or args.triton_serve:
        from .baselines import triton_replay

        jobs.append(("slora_triton", lambda: triton_replay.run(args, workload, base_model, kwargs,
                                                               adapter_root, log)))
    rows = []
    for name, job in jobs:
        try:
            result = job()
        except Exception as e:  # noqa: BLE001 - reported in the row
            import traceback

            log(f"{tag} {name} failed: {e!r}")
            result = {"system": _SYSTEM_NAMES.get(name, name), "error": repr(e),
                      "traceback": traceback.format_exc()[-3000:], "note": f"failed: {e!r}"[:200]}
        for one in result if isinstance(result, list) else [result]:  # (e) gives several rows
            rows.append(_row(workload, one))
            if "error" not in one:
                log("  " + _brief(one))
    return rows


_SYSTEM_NAMES = {"b": "no_lora", "c": "bmm", "d": "no_unified"}


def run_engine_variant(args, workload, key, kwargs, base_model, adapter_root, tag,
                       log) -> dict[str, Any]:
    from .baselines import engine_replay

    pages = None
    if key == "d":
        from slora_backend import EngineConfig

        block = kwargs.get("block_tokens", EngineConfig.block_tokens)
        seqs = kwargs.get("max_num_seqs", EngineConfig.max_num_seqs)
        slots = args.partition_adapters or min(workload.config.num_adapters, seqs)
        ranks = get_setting(workload.config.setting).ranks
        pages = engine_replay.partition_pages(base_model, block, max(ranks), slots)
    v = engine_replay.variant(key, pages)
    limit = args.slow_baseline_limit if key == "c" else args.time_limit
    log(f"{tag} {v.label} (limit {limit or 'none'} s)")
    return engine_replay.run_variant(kwargs, v, workload, adapter_root, slo_s=args.slo,
                                     time_limit_s=limit, prompt_seed=args.seed,
                                     profile_dir=args.profile_dir, profile_options=dict(
                                         cprofile=args.cprofile, kernel_window=args.kernel_trace,
                                         timeline=args.timeline, launch_lag=args.launch_lag),
                                     log=log)


def run_peft(args, workload, base_model, adapter_root, log) -> dict[str, Any]:
    import torch

    from .baselines import peft_serving
    from .baselines.engine_replay import free_device_memory

    log(f"[{workload.config.setting} n={workload.config.num_adapters}] (a) transformers + PEFT "
        f"(limit {args.slow_baseline_limit or 'none'} s, prefix {args.peft_max_requests or 'all'})")
    try:
        return peft_serving.replay(
            workload, base_model, adapter_root, device=args.device, dtype=args.dtype,
            max_batch_size=args.peft_max_batch, time_limit_s=args.slow_baseline_limit,
            max_requests=args.peft_max_requests, slo_s=args.slo, seed=args.seed, log=log)
    finally:
        free_device_memory(torch.device(args.device))


def _brief(r: dict[str, Any]) -> str:
    return (f"{r['system']}: {r.get('throughput_req_s')} req/s, {r.get('throughput_out_tok_s')} "
            f"tok/s, TTFT p50 {r.get('ttft_p50_s')} s, SLO {r.get('slo_attainment')}, "
            f"{r.get('requests_completed')}/{r.get('requests_planned')} done"
            + (f" ({r['note']})" if r.get("note") else ""))


def comparisons(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios the issue's targets are stated in, per (setting, n, alpha)."""
    out: dict[str, Any] = {}
    keyed: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r.get("vllm_best") is False:  # vLLM + LoRA is compared at its best max_loras
            continue
        keyed.setdefault((r["setting"], r["n"], r["alpha"], r["rate"]), {})[r["system"]] = r
    for (setting, n, alpha, rate), systems in keyed.items():
        s = systems.get("slora")
        if s is None or not s.get("throughput_req_s"):
            continue
        tput = s["throughput_req_s"]
        c: dict[str, Any] = {}
        for system, key in (("no_lora", "slora_over_no_lora"), ("peft", "slora_over_peft"),
                            ("bmm", "slora_over_bmm"), ("no_unified", "slora_over_no_unified"),
                            ("slora_triton", "triton_over_in_process")):
            other = systems.get(system, {})
            for metric, suffix in (("throughput_req_s", ""), ("throughput_steady_req_s", "_steady")):
                mine, theirs = s.get(metric), other.get(metric)
                if mine and theirs:
                    ratio = theirs / mine if system == "slora_triton" else mine / theirs
                    c[key + suffix] = round(ratio, 3)
        c.update(vllm_peer.comparisons(systems))
        if (setting, n) in PAPER_SLORA:  # the paper's figure was at R = 10, alpha = 1
            paper = PAPER_SLORA[(setting, n)]
            c["paper_a100_req_s"] = paper
            c["slora_over_paper_a100"] = round(tput / paper, 3)
            if s.get("throughput_steady_req_s"):
                c["slora_over_paper_a100_steady"] = round(s["throughput_steady_req_s"] / paper, 3)
        if c:
            out[f"{setting} n={n} alpha={alpha} R={rate}"] = c
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    return "\n".join([markdown_header(), *(markdown_row(r) for r in rows)])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    w = ap.add_argument_group("workload")
    w.add_argument("--setting", default="S1", help="S1 (7B, r 8), S2 (7B, r 64/32/16/8), S4")
    w.add_argument("--n", type=int, default=100, help="number of adapters")
    w.add_argument("--alpha", type=float, default=1.0, help="popularity (1 uniform, <1 skewed)")
    w.add_argument("--rate", type=float, default=10.0, help="requests per second")
    w.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gaps")
    w.add_argument("--duration", type=float, default=60.0, help="trace length (s)")
    w.add_argument("--input-range", type=int, nargs=2, default=[8, 512], metavar=("LO", "HI"))
    w.add_argument("--output-range", type=int, nargs=2, default=[8, 512], metavar=("LO", "HI"))
    w.add_argument("--seed", type=int, default=42)
    s = ap.add_argument_group("systems")
    s.add_argument("--baselines", default="", help="comma list of a,b,c,d,e")
    s.add_argument("--no-slora", action="store_true", help="run only the baselines")
    s.add_argument("--time-limit", type=float, default=None,
                   help="seconds per replay (slora, b, d, triton); later requests are not sent")
    s.add_argument("--slow-baseline-limit", type=float, default=120.0,
                   help="seconds for (a) PEFT and (c) bmm, which are far slower (0 = no limit)")
    s.add_argument("--peft-max-requests", type=int, default=None,
                   help="replay only this prefix of the trace in (a)")
    s.add_argument("--peft-max-batch", type=int, default=6, help="(a)'s max batch (paper: 6)")
    s.add_argument("--partition-adapters", type=int, default=None,
                   help="(d): adapters of the set's max rank the fixed partition holds "
                        "(default min(n, max_num_seqs))")
    s.add_argument("--triton-url", default=None, help="replay through this tritonserver too")
    s.add_argument("--triton-serve", action="store_true",
                   help="start a tritonserver (slora_backend.serve) and replay through it too")
    s.add_argument("--triton-streams", type=int, default=2, help="gRPC streams to spread over")
    s.add_argument("--triton-stream-interval", type=int, default=1, metavar="N",
                   help="--triton-serve: the server's stream_interval (new tokens per response)")
    s.add_argument("--triton-log", default=None)
    s.add_argument("--triton-ready-timeout", type=float, default=300.0)
    s.add_argument("--tokenizer", default="word",
                   help="tokenizer for Triton's text prompts: a directory, or 'word' (a "
                        "word-level tokenizer of the model's vocabulary, written to the cache)")
    e = ap.add_argument_group("engine")
    e.add_argument("--base-model", default=None, help="default random:<setting's shape>")
    e.add_argument("--device", default="cuda")
    e.add_argument("--dtype", default="float16")
    e.add_argument("--pool-pages", type=int, default=None)
    e.add_argument("--max-num-seqs", type=int, default=None)
    e.add_argument("--max-batched-tokens", type=int, default=None)
    e.add_argument("--slo", type=float, default=DEFAULT_SLO_S, help="first-token SLO (s)")
    e.add_argument("--early-abort", action="store_true", help="engine drops hopeless requests")
    e.add_argument("--max-waiting", type=int, default=None)
    e.add_argument("--engine-param", action="append", default=[], metavar="KEY=VALUE")
    vllm_peer.add_arguments(ap)
    o = ap.add_argument_group("output")
    o.add_argument("--cache", default=str(DEFAULT_CACHE), help="adapter cache directory")
    o.add_argument("--gen-workers", type=int, default=None)
    o.add_argument("--json", type=Path, default=None)
    o.add_argument("--markdown", type=Path, default=None)
    o.add_argument("--profile-dir", type=Path, default=None,
                   help="write each engine replay's step profile here (benchmarks.step_profile)")
    o.add_argument("--cprofile", action="store_true",
                   help="with --profile-dir: also cProfile the engine thread (slows it ~2x)")
    o.add_argument("--kernel-trace", type=_step_window, default=None, metavar="FIRST:COUNT",
                   help="with --profile-dir: GPU time per kernel over COUNT steps from step FIRST, "
                        "or over COUNT steps of one kind (FIRST = mixed or decode, optionally "
                        "@MIN_BATCH, e.g. decode@192:10)")
    o.add_argument("--timeline", action="store_true",
                   help="with --kernel-trace: also record host ops and write the first steps' "
                        "Chrome traces")
    o.add_argument("--launch-lag", action="store_true",
                   help="with --profile-dir: mark each layer's start in eager steps (host time, "
                        "CUDA event): host- or GPU-bound, step by step")
    return ap


def _step_window(text: str) -> tuple[int | str, int]:
    first, _, count = text.partition(":")
    try:
        if first[:1].isdigit():
            window: tuple[int | str, int] = int(first), int(count)
        else:
            parse_step_kind(first)
            window = first, int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected FIRST:COUNT (FIRST an integer, 'mixed' or 'decode', optionally "
            f"@MIN_BATCH), got {text!r}") from None
    if (isinstance(window[0], int) and window[0] < 0) or window[1] < 1:
        raise argparse.ArgumentTypeError(f"FIRST must be >= 0 and COUNT >= 1, got {text!r}")
    return window


def normalize(args: argparse.Namespace) -> argparse.Namespace:
    args.baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    bad = [b for b in args.baselines if b not in BASELINES]
    if bad:
        raise SystemExit(f"--baselines: unknown {bad}; choose from {','.join(BASELINES)}")
    if args.slow_baseline_limit == 0:
        args.slow_baseline_limit = None
    if "e" in args.baselines:  # bad vLLM flags fail before any replay
        vllm_peer.planned_runs(args, args.n, args.max_num_seqs or 1)
    return args


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    workload = generate(workload_config(args))
    setting = get_setting(args.setting)
    base_model = args.base_model or f"random:{setting.base_shape}"
    needs_adapters = (not args.no_slora or any(b in args.baselines for b in "acd")
                      or args.triton_serve or ("e" in args.baselines and "lora" in args.vllm_modes))
    root = None
    if needs_adapters:
        t0 = time.perf_counter()
        root = ensure_adapter_set(Path(args.cache), args.setting, args.n, base=base_model,
                                  workers=args.gen_workers, log=log)
        log(f"adapters ready in {root} ({time.perf_counter() - t0:.1f} s)")
    log(f"trace: {json.dumps(workload.summary())}")
    rows = run_systems(args, workload, adapter_root=root, log=log)
    return {
        "meta": run_metadata(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workload": {"config": workload.config.to_dict(), "summary": workload.summary()},
        "results": rows,
        "comparisons": comparisons(rows),
        "markdown": markdown_table(rows),
    }


def exit_on_sigterm() -> None:
    """Turn SIGTERM (a timeout's kill) into SystemExit, so ``finally`` blocks stop the
    tritonserver this process started (it runs in its own session and would outlive us)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = normalize(build_parser().parse_args(argv))
    report = run(args)
    print(report["markdown"])
    print(json.dumps(report["comparisons"], indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report["markdown"] + "\n")
    return report


if __name__ == "__main__":
    exit_on_sigterm()
    main()
