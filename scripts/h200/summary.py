"""One line per system of harness JSON files: req/s (steady), served TTFT p50/p90/p99, the
server's own first-token figures when the row went through tritonserver, steps by kind and the
device's time per step of each, the adapter copies' seconds, and the GPU's SM clock at the end
of the replay."""

from __future__ import annotations

import json
import sys


def line(r: dict) -> str:
    out = (f"{r['setting']} n={r['n']} R={r['rate']} {r['system']:<24} "
           f"{r['throughput_req_s']} ({r['throughput_steady_req_s']}) "
           f"ttft {r['ttft_p50_s']}/{r['ttft_p90_s']}/{r['ttft_p99_s']} "
           f"done {r['requests_completed']}/{r['requests_submitted']}")
    if r.get("server_ttft_p50_s") is not None:
        out += (f" server ttft {r['server_ttft_p50_s']}/{r['server_ttft_p90_s']}"
                f" first-response delay {r['server_first_response_delay_p50_s']}"
                f"/{r['server_first_response_delay_p90_s']}")
    if r.get("steps") is not None:
        out += f" steps {r['steps']} graph {r.get('graph_steps')} idle {r.get('device_idle_between_steps')}"
        for kind in ("graph", "piecewise"):  # the device's ms per step of each kind
            steps = r.get(f"{kind}_steps") or 0
            if steps:
                out += f" {kind} {1e3 * r[f'device_seconds_{kind}'] / steps:.1f} ms"
    if r.get("adapter_copy_host_seconds") is not None:
        out += (f" copies host/wait/device {r['adapter_copy_host_seconds']}"
                f"/{r['adapter_copy_wait_seconds']}/{r['adapter_copy_device_seconds']} s")
    gpu = r.get("gpu_state_after")
    if gpu:
        out += f" sm {gpu.get('clocks.sm')} ({gpu.get('pstate')}, {gpu.get('power.draw')})"
    return out


for path in sys.argv[1:]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        print(f"{path}: unreadable ({e})")
        continue
    for row in data.get("results", []):
        print(line(row))
    print(data.get("comparisons"))
