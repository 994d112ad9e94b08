"""One harness run: the trace, its adapters on disk, every system's row, the ratios the targets
are stated in (against the paper's A100 numbers too) and the report."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .adapter_sets import ensure_adapter_set
from .baselines import vllm_peer
from .harness_systems import run_systems
from .metrics import markdown_header, markdown_row
from .run_metadata import run_metadata
from .workload import WorkloadConfig, generate, get_setting

# The paper's S-LoRA and HF PEFT throughput on one A100-80GB (req/s, R = 10, alpha = 1, cv = 1).
PAPER_SLORA = {("S1", 5): 8.05, ("S1", 100): 7.99, ("S1", 1000): 7.64, ("S1", 2000): 7.61,
               ("S2", 5): 7.48, ("S2", 100): 7.29, ("S2", 1000): 6.69, ("S2", 2000): 6.71,
               ("S4", 2): 4.49, ("S4", 100): 4.28, ("S4", 1000): 3.96}
PAPER_PEFT = {("S1", 5): 0.88, ("S1", 100): 0.25, ("S2", 5): 0.74, ("S2", 100): 0.24,
              ("S4", 2): 0.54, ("S4", 100): 0.13}


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(setting=args.setting, num_adapters=args.n, alpha=args.alpha,
                          rate=args.rate, cv=args.cv, duration_s=args.duration,
                          input_range=tuple(args.input_range),
                          output_range=tuple(args.output_range), seed=args.seed)


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
