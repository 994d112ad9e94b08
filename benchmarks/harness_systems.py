"""The systems a harness run replays its trace into: this engine (``slora``) and its ablations
(b) ``no_lora``, (c) ``bmm``, (d) ``no_unified``, (a) PEFT, (e) vLLM and Triton; one result row
each, a failed system's row carrying its error."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from .baselines import vllm_peer
from .workload import Workload, get_setting

BASELINES = ("a", "b", "c", "d", "e")
_SYSTEM_NAMES = {"b": "no_lora", "c": "bmm", "d": "no_unified"}


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
        if raw.lower() in ("none", "null", ""):
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


def parse_slora_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE[,KEY=VALUE]`` -> (NAME, EngineConfig changes)."""
    name, sep, params = spec.partition(":")
    if not sep or not name or not params:
        raise ValueError(f"slora variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
    return name, parse_engine_params(params.split(","))


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
    for name, changes in map(parse_slora_variant, args.slora_variant):
        jobs.append((f"slora:{name}", lambda name=name, changes=changes: run_engine_variant(
            args, workload, "slora", {**kwargs, **changes}, base_model, adapter_root, tag, log,
            renamed=(f"slora:{name}", changes))))
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


def run_engine_variant(args, workload, key, kwargs, base_model, adapter_root, tag, log,
                       renamed: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One replay into this engine: ``key`` is slora or a baseline letter; ``renamed`` (a
    ``--slora-variant``: its system name and config changes) names the row."""
    import dataclasses

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
    if renamed is not None:
        system, changes = renamed
        v = dataclasses.replace(v, system=system, label="S-LoRA with " + ", ".join(
            f"{k}={changes[k]}" for k in sorted(changes)))
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
