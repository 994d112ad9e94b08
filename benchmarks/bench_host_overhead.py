"""Host time of the calls a step makes, on the GPU machine: what an eager step pays per launch.

Four measurements, no syncs inside the timed loops (host time, not GPU time):

- ``--launches``: host microseconds per call of small torch ops, the LoRA launchers, and two
  kernels launched through Triton's ``JITFunction`` and through ``CachedLaunch`` (Llama-2-7B
  qkv shapes, batch 256, rank 8);
- ``--mixed-step B P``: host milliseconds per step spent in each op of the forward (and in
  ``execute`` / ``model.forward`` around them) over mixed steps - a decode batch of B requests
  over B adapters in which one request is replaced by a new P-token prompt each step - with
  and without adapters (``bench_decode_step.measure`` drives the engine);
- ``--step-metadata B`` (any device, CPU included): host milliseconds ``ModelRunner.execute``
  spends turning a decode batch of B requests over B adapters into tensors (the forward itself
  stubbed out), with and without adapters, and of that the LoRA tables (``_lora_batch``);
- ``--mixed-replica B P`` (CPU): the host side of a mixed step - B decode rows over B adapters
  plus four prompts of P / 4 tokens - on a tiny model with every Triton kernel replaced by a
  no-op launch, with and without adapters: ``execute`` split into the LoRA calls, the LoRA
  tables, ``F.linear`` (real work on CPU), attention and the rest (the engine's own Python).

    python -m benchmarks.bench_host_overhead --launches --mixed-step 256 256 --out DIR
    python -m benchmarks.bench_host_overhead --step-metadata 256 --device cpu --out DIR
    python -m benchmarks.bench_host_overhead --mixed-replica 200 2000 --out DIR
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path
from typing import Any


def host_us(fn, n: int = 2000) -> float:
    import torch

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return round(host, 2)


def _add_host_time(owner: Any, attr: str, spent: dict[str, float], part: str,
                   calls: collections.Counter | None = None) -> None:
    """Wrap ``owner.attr`` so that its host time adds to ``spent[part]`` (its calls to
    ``calls[part]``)."""
    inner = getattr(owner, attr)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[part] += time.perf_counter() - t
            if calls is not None:
                calls[part] += 1

    setattr(owner, attr, timed)


def _captured(module: Any, name: str, call) -> tuple[Any, tuple, tuple, dict]:
    """(kernel, grid, args, kwargs) of the launch of ``module.name`` that ``call()`` makes."""
    wrapper, seen = getattr(module, name), []

    class _Spy:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((grid, args, kwargs))

    setattr(module, name, _Spy())
    try:
        call()
    finally:
        setattr(module, name, wrapper)
    return (wrapper, *seen[0])


def launches() -> dict[str, float]:
    """Host us per call. Each kernel twice more: its launch through Triton's ``JITFunction``
    (``kernel[grid]``) and through ``CachedLaunch`` (what the launchers use)."""
    import torch
    import torch.nn.functional as F
    from slora_kernels import lora_prefill, norm_rope
    from slora_kernels.lora_decode import lora_shrink_decode
    from slora_kernels.lora_prefill import lora_shrink_prefill
    from slora_kernels.norm_rope import rms_norm

    from .kernel_bench import shapes as bk

    b, dev, dt = 256, "cuda", torch.float16
    ad = bk.Adapters(b, (8,), torch.Generator().manual_seed(0))
    mods = bk.QKV[0]
    x = torch.randn(b, bk.H, device=dev, dtype=dt)
    slots = torch.arange(b, dtype=torch.int32, device=dev)
    args = ad.args(slots, (slots, torch.ones_like(slots), slots), max_seg_len=1)
    w = torch.randn(bk.H, device=dev, dtype=dt)
    small_w, small_x = torch.randn(64, bk.H, device=dev, dtype=dt), x[:8]
    out = {
        "torch.zeros": host_us(lambda: torch.zeros(b, 3, 8, device=dev, dtype=dt)),
        "torch.empty": host_us(lambda: torch.empty(b, 3, 8, device=dev, dtype=dt)),
        "F.linear small": host_us(lambda: F.linear(small_x, small_w)),
        "tensor add": host_us(lambda: small_x + small_x),
        "rms_norm launcher": host_us(lambda: rms_norm(x, w, 1e-5)),
        "sgmv shrink launcher": host_us(lambda: lora_shrink_prefill(x, ad.pool, args, mods)),
        "bgmv shrink launcher": host_us(lambda: lora_shrink_decode(x, ad.pool, args, mods)),
    }
    for tag, module, name, call in (
        ("sgmv shrink", lora_prefill, "_sgmv_shrink_kernel",
         lambda: lora_shrink_prefill(x, ad.pool, args, mods)),
        ("rms_norm", norm_rope, "_rms_norm_kernel", lambda: rms_norm(x, w, 1e-5)),
    ):
        out.update(_jit_vs_cached(tag, module, name, call))
    return out


def _jit_vs_cached(tag: str, module: Any, name: str, call) -> dict[str, float]:
    cached, grid, args, kwargs = _captured(module, name, call)
    return {f"{tag} JITFunction kernel[grid]": host_us(lambda: cached.kernel[grid](*args, **kwargs)),
            f"{tag} CachedLaunch kernel[grid]": host_us(lambda: cached[grid](*args, **kwargs))}


def mixed_step(batch: int, prompt: int) -> dict[str, Any]:
    import torch.nn.functional as F

    from slora_backend import Engine, EngineConfig
    from slora_backend.ops.triton_ops import TritonOps

    from . import bench_decode_step as bds
    from .adapter_sets import DEFAULT_CACHE, registered_set

    spent: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()

    def wrap(owner: Any, attr: str) -> None:
        _add_host_time(owner, attr, spent, attr, calls)

    root, names = registered_set(DEFAULT_CACHE, "S1", batch, base="random:llama-7b")
    engine = Engine(EngineConfig(base_model="random:llama-7b", adapter_root=str(root),
                                 device="cuda", dtype="float16", max_num_seqs=batch,
                                 admit_wait_steps=0))
    for op in ("lora_shrink", "lora_expand", "attention", "write_kv", "rms_norm", "add_rms_norm",
               "silu_and_mul", "rotary"):
        wrap(TritonOps, op)
    wrap(F, "linear")
    wrap(engine.runner, "execute")
    wrap(engine.runner, "_lora_batch")
    result: dict[str, Any] = {"batch": batch, "prompt": prompt}
    timed_steps = bds.timed_steps
    try:
        for tag, batch_names in (("lora", list(names)), ("base", [None] * batch)):
            def timed(engine, iters, before_step=lambda i: None, tag=tag):
                if before_step.__name__ != "replace_one":  # the decode-only steps
                    return timed_steps(engine, iters, before_step)
                def counted(i: int) -> None:  # (timed_steps runs one step before the window)
                    if i == 0:
                        spent.clear()
                        calls.clear()
                    before_step(i)

                out = timed_steps(engine, iters, counted)
                result[f"{tag}_host_ms_per_step"] = {
                    k: round(v / iters * 1e3, 3) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}
                result[f"{tag}_calls_per_step"] = {k: v / iters for k, v in calls.items()}
                return out

            bds.timed_steps = timed
            m = bds.measure(engine, batch_names, 512, 3, 10, 0, prompt)
            result[tag] = {k: m[k] for k in ("step_ms_median", "mixed_step_ms_median")}
    finally:
        bds.timed_steps = timed_steps
        engine.stop()
    return result


def step_metadata(batch: int, device: str, iters: int = 50) -> dict[str, Any]:
    import tempfile

    import torch

    from slora_backend import Engine, EngineConfig, SamplingParams

    from .adapter_sets import registered_set

    base = "random:tiny-mha"  # host work does not depend on the model's size
    cache = Path(tempfile.gettempdir()) / "slora-bench-host-overhead"
    root, names = registered_set(cache, "S1", batch, base=base, log=lambda *_: None)
    engine = Engine(EngineConfig(base_model=base, adapter_root=str(root), device=device,
                                 max_num_seqs=batch, pool_pages=16 * batch,
                                 max_batched_tokens=64 * batch, cuda_graphs=False))
    for i, name in enumerate(names):
        engine.add_request([3 + (i + j) % 100 for j in range(64)],
                           SamplingParams(max_tokens=iters + 16, ignore_eos=True), name)
    while len(engine.scheduler.running) < batch:
        engine.step()
    engine.step()  # every request decodes from here on
    runner, scheduled = engine.runner, engine.scheduler.schedule().scheduled
    residents = {s.request.adapter: engine.adapters.cache.get(s.request.adapter) for s in scheduled}
    # the engine's last step is still in flight: its tokens are these rows' inputs
    pending = engine._in_flight.pending()
    runner.model.forward = lambda ids, ctx, rows: torch.zeros(rows.shape[0], 1)
    lora_batch, spent = runner._lora_batch, [0.0]

    def timed_lora_batch(*args, **kwargs):
        t = time.perf_counter()
        try:
            return lora_batch(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t

    runner._lora_batch = timed_lora_batch
    result: dict[str, Any] = {"batch": batch, "device": device}
    for tag in ("lora", "base"):
        if tag == "base":
            for s in scheduled:
                s.request.adapter = None
            residents = {}
        spent[0] = 0.0
        t = time.perf_counter()
        for _ in range(iters):
            runner.execute(scheduled, residents, pending)
        result[f"{tag}_execute_ms"] = round((time.perf_counter() - t) / iters * 1e3, 3)
        result[f"{tag}_lora_tables_ms"] = round(spent[0] / iters * 1e3, 3)
    return result


def mixed_replica(batch: int, prompt: int, iters: int = 10) -> dict[str, Any]:
    import tempfile

    import torch
    import torch.nn.functional as F
    from slora_kernels import lora_decode, lora_prefill, norm_rope, paged_attention

    from slora_backend import Engine, EngineConfig, SamplingParams

    from .adapter_sets import registered_set

    class _NoLaunch:  # kernel[grid](...) does nothing: only the host side is left
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    stubbed = {}
    for module in (lora_decode, lora_prefill, norm_rope, paged_attention):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                stubbed[(module, name)] = getattr(module, name)
                setattr(module, name, _NoLaunch())
    prompts = 4
    base = "random:tiny-mha"
    cache = Path(tempfile.gettempdir()) / "slora-bench-host-overhead"
    root, names = registered_set(cache, "S1", batch + prompts, base=base, log=lambda *_: None)
    engine = Engine(EngineConfig(base_model=base, adapter_root=str(root), device="cpu",
                                 kernel_backend="triton", max_num_seqs=batch + prompts,
                                 pool_pages=32 * batch, max_batched_tokens=batch + prompt,
                                 cuda_graphs=False))
    # With the kernels stubbed out the logits are whatever memory held (NaN at times), which
    # the sampler would end as a numerical fault: sample from finite garbage instead.
    sample = engine.sampler.sample_on_device
    engine.sampler.sample_on_device = lambda logits, ids, params: sample(
        torch.nan_to_num(logits), ids, params)
    spent: dict[str, float] = collections.defaultdict(float)
    for attr, part in (("lora_shrink", "lora_calls"), ("lora_expand", "lora_calls"),
                       ("attention", "attention")):
        _add_host_time(engine.runner.ops, attr, spent, part)
    _add_host_time(engine.runner, "_lora_batch", spent, "lora_tables")
    linear = F.linear
    _add_host_time(F, "linear", spent, "linear")
    result: dict[str, Any] = {"batch": batch, "prompt_tokens": prompt, "device": "cpu"}
    try:
        for name in names:
            engine.adapters.store.weights(name)  # in host memory: admission does not wait for reads
        for tag in ("lora", "base"):
            def adapter(i: int, tag: str = tag) -> str | None:
                return names[i] if tag == "lora" else None

            for i in range(batch):
                engine.add_request([3 + (i + j) % 100 for j in range(32)],
                                   SamplingParams(max_tokens=iters + 8, ignore_eos=True), adapter(i))
            while len(engine.scheduler.running) < batch:
                engine.step()
            engine.step()  # every request decodes from here on
            for k in range(prompts):
                engine.add_request([5 + (j + k) % 90 for j in range(prompt // prompts)],
                                   SamplingParams(max_tokens=1), adapter(batch + k))
            engine._drain_inbox()
            scheduled = engine.scheduler.schedule().scheduled
            pending = engine._in_flight.pending()  # (the last step's tokens: decode inputs)
            engine.adapters.copier.submit(engine.adapters.cache.take_pending())
            engine.adapters.copier.wait(None)
            tokens = sum(s.num_new_tokens for s in scheduled)
            residents = {s.request.adapter: engine.adapters.cache.get(s.request.adapter)
                         for s in scheduled if s.request.adapter is not None}
            spent.clear()
            t = time.perf_counter()
            for _ in range(iters):
                engine.runner.execute(scheduled, residents, pending)
            total = (time.perf_counter() - t) / iters
            parts = {k: round(v / iters * 1e3, 3) for k, v in spent.items()}
            parts["rest"] = round(total * 1e3 - sum(parts.values()), 3)
            result[tag] = {"tokens": tokens, "execute_ms": round(total * 1e3, 3), **parts}
            for s in scheduled:
                engine.abort(s.request.request_id)
            while engine.scheduler.running or engine.scheduler.waiting:
                engine.step()
    finally:
        F.linear = linear
        for (module, name), kernel in stubbed.items():
            setattr(module, name, kernel)
        engine.stop()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", action="store_true")
    ap.add_argument("--mixed-step", type=int, nargs=2, metavar=("BATCH", "PROMPT"))
    ap.add_argument("--step-metadata", type=int, metavar="BATCH")
    ap.add_argument("--mixed-replica", type=int, nargs=2, metavar=("BATCH", "PROMPT"))
    ap.add_argument("--device", default="cuda", help="for --step-metadata")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from .run_metadata import run_metadata

    result: dict[str, Any] = {"meta": run_metadata()}
    if args.launches:
        result["host_us_per_call"] = launches()
    if args.mixed_step:
        result["mixed_step"] = mixed_step(*args.mixed_step)
    if args.step_metadata:
        result["step_metadata"] = step_metadata(args.step_metadata, args.device)
    if args.mixed_replica:
        result["mixed_replica"] = mixed_replica(*args.mixed_replica)
    print(json.dumps(result, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_overhead.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
