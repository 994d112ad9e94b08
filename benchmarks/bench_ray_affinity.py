"""Adapter affinity on Ray Serve: a skewed trace (default alpha 0.3 over 200 adapters) replayed
against 2 replicas with affinity on (the adapter name as the multiplexed model id) and off (any
replica), reporting adapter loads per replica (the replicas' engine counters) and TTFT.

    python -m benchmarks.bench_ray_affinity --num-requests 200 --rate 20 --out /tmp/affinity.json

CPU-sized by default: the random tiny GQA model with the SmolLM2 tokenizer, short prompts and
outputs. Each setting starts its own Ray Serve application (fresh replicas, empty caches).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.synthetic_adapters import write_random_adapter
from benchmarks.workload import WorkloadConfig, generate


def stream_ttft(url: str, body: dict) -> tuple[float, bool]:
    """Seconds to the first streamed event, and whether the request ended without error."""
    req = urllib.request.Request(f"{url}/v2/models/slora/generate_stream", method="POST",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start, first, ok = time.monotonic(), None, True
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data: "):
                first = first or time.monotonic() - start
                ok = ok and b'"error"' not in line
    return (first if first is not None else float("nan")), ok


def replica_stats(state_dir: Path) -> list[dict]:
    out = []
    for path in sorted(state_dir.glob("*.json")):
        replica = json.loads(path.read_text())
        body = {"inputs": [{"name": "action", "shape": [1], "datatype": "BYTES", "data": ["stats"]}]}
        req = urllib.request.Request(f"{replica['http_url']}/v2/models/slora_adapters/infer",
                                     data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            stats = json.loads(json.loads(r.read())["outputs"][0]["data"][0])
        out.append({"replica": replica["replica_id"], "adapter_loads": stats["adapter_loads"],
                    "adapter_misses": stats["adapter_misses"],
                    "adapters_registered": stats["adapters_registered"]})
    return out


def run_setting(args, affinity: bool, adapter_root: Path, trace, work: Path) -> dict:
    import ray
    from ray import serve

    from slora_backend.launcher.server import free_ports
    from slora_backend.ray_serve import LaunchOptions, RayServeOptions, build_app

    state = work / f"state-{'on' if affinity else 'off'}"
    launcher = ["--device", "cpu", "--dtype", "float32", "--kernel-backend", "torch"]
    if args.tokenizer:
        launcher += ["--tokenizer", args.tokenizer]
    options = RayServeOptions(num_replicas=args.replicas, max_adapters_per_replica=args.max_adapters,
                              replica_num_cpus=0.5, state_dir=str(state), affinity=affinity,
                              launch=LaunchOptions(base_model=args.base_model,
                                                   adapter_root=str(adapter_root),
                                                   launcher_args=tuple(launcher), log_dir=str(work)))
    (port,) = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(options), name="slora", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    ttfts, errors, threads = [], [], []
    start = time.monotonic()

    def one(r):
        body = {"text_input": "hello " * r.prompt_len, "max_tokens": r.output_len,
                "ignore_eos": True, "stream": True, "lora_name": r.adapter or ""}
        try:
            ttft, ok = stream_ttft(url, body)
            ttfts.append(ttft)
            errors.append(not ok)
        except Exception:
            errors.append(True)

    for r in trace.requests:
        time.sleep(max(0.0, r.arrival_s - (time.monotonic() - start)))
        threads.append(threading.Thread(target=one, args=(r,)))
        threads[-1].start()
    for t in threads:
        t.join()
    stats = replica_stats(state)
    serve.delete("slora")
    serve.shutdown()
    ray.shutdown()
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False)
    return {"affinity": affinity, "requests": len(trace.requests), "errors": int(sum(errors)),
            "ttft_p50_s": float(np.nanpercentile(ttfts, 50)),
            "ttft_p90_s": float(np.nanpercentile(ttfts, 90)),
            "adapter_loads_total": sum(s["adapter_loads"] for s in stats), "replicas": stats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=20.0, help="requests per second")
    p.add_argument("--num-adapters", type=int, default=200)
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--max-adapters", type=int, default=64, help="max_num_models_per_replica")
    p.add_argument("--base-model", default="random:tiny-gqa")
    p.add_argument("--tokenizer", help="default: the SmolLM2 tokenizer (its GGUF conversion)")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    if args.tokenizer is None and args.base_model.startswith("random:"):
        from slora_backend.default_model import smollm2_dir

        args.tokenizer = str(smollm2_dir())
    import ray

    from slora_backend.model_loader import random_config
    from slora_backend.model_spec import ModelSpec

    config = WorkloadConfig(num_adapters=args.num_adapters, alpha=args.alpha, rate=args.rate,
                            duration_s=args.num_requests / args.rate, input_range=(8, 64),
                            output_range=(8, 32))
    trace = generate(config)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    root = work / "adapters"
    spec = ModelSpec.from_hf_config(random_config(args.base_model.split(":", 1)[1]))
    for i, a in enumerate(trace.adapters):
        write_random_adapter(root / a.name, spec, a.rank, ["q_proj", "k_proj", "v_proj", "o_proj"],
                             seed=i, dtype=__import__("torch").float32)
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False)
    results = [run_setting(args, affinity, root, trace, work) for affinity in (True, False)]
    ray.shutdown()
    for r in results:
        print(f"affinity={'on ' if r['affinity'] else 'off'} requests={r['requests']} "
              f"errors={r['errors']} TTFT p50={r['ttft_p50_s']:.3f}s p90={r['ttft_p90_s']:.3f}s "
              f"adapter loads total={r['adapter_loads_total']} per replica="
              f"{[s['adapter_loads'] for s in r['replicas']]}")
    if args.out:
        Path(args.out).write_text(json.dumps({"config": config.to_dict(), "results": results},
                                             indent=2))


if __name__ == "__main__":
    main()
