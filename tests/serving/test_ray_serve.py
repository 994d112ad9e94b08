"""Two replicas of slora-triton under Ray Serve on 127.0.0.1 (the tiny model on CPU): requests
stay with the replica that already holds their adapter (counted by the replicas' engines, not by
the router), outputs equal the engine's, and a replica killed mid-run loses no request silently."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from slora_backend import Engine, EngineConfig, SamplingParams
from tests.conftest import make_adapter
from tests.serving.conftest import free_ports, http_post, sse_events, wait_for

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
from slora_backend.ray_serve import LaunchOptions, RayServeOptions, build_app  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow]

ADAPTER_NAMES = [f"a{i}" for i in range(8)]
PROMPTS = ["The quick brown fox", "Paris is the capital of", "1, 2, 3, 4,"]
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_gqa):
    tmp = tmp_path_factory.mktemp("ray-serve")
    root = tmp / "adapters"
    for i, name in enumerate(ADAPTER_NAMES):
        make_adapter(tiny_gqa, root / name, rank=4 + 4 * (i % 2), targets=["q_proj", "v_proj"],
                     alpha=16, seed=100 + i, scale=3.0)
    (port,) = free_ports(1)
    options = RayServeOptions(
        num_replicas=2, max_adapters_per_replica=len(ADAPTER_NAMES), replica_num_cpus=0.5,
        state_dir=str(tmp / "state"),
        launch=LaunchOptions(base_model=str(tiny_gqa), adapter_root=str(root), log_dir=str(tmp),
                             launcher_args=("--device", "cpu", "--dtype", "float32",
                                            "--kernel-backend", "torch",
                                            "--tritonserver-arg=--exit-timeout-secs=10")))
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(options), name="slora", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "root": root, "state": tmp / "state",
               "options": options}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_gqa, deployment):
    engine = Engine(EngineConfig(base_model=str(tiny_gqa), adapter_root=str(deployment["root"]),
                                 kernel_backend="torch"))
    cases = [(p, a) for p in PROMPTS for a in [None, *ADAPTER_NAMES]]
    outs = engine.generate([p for p, _ in cases], SamplingParams(max_tokens=MAX_TOKENS),
                           [a for _, a in cases])
    return {case: out.text for case, out in zip(cases, outs)}


def replicas(state_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(state_dir.glob("*.json"))]


def adapter_action(http_url: str, action: str, lora_name: str = "") -> tuple[int, dict]:
    body = {"inputs": [{"name": n, "shape": [1], "datatype": "BYTES", "data": [v]}
                       for n, v in (("action", action), ("lora_name", lora_name))]}
    status, text = http_post(f"{http_url}/v2/models/slora_adapters/infer", body)
    if status != 200:
        return status, json.loads(text)
    return status, json.loads(json.loads(text)["outputs"][0]["data"][0])


def requests_served(http_url: str, lora_name: str) -> int:
    """The replica engine's own count of requests that used the adapter (0: never loaded)."""
    status, info = adapter_action(http_url, "describe", lora_name)
    return info["total_requests"] if status == 200 else 0


def call(url: str, prompt: str, lora: str | None, stream: bool) -> tuple[int, str]:
    body = {"text_input": prompt, "max_tokens": MAX_TOKENS, "exclude_input_in_output": True}
    if lora:
        body["lora_name"] = lora
    if not stream:
        status, text = http_post(f"{url}/v2/models/slora/generate", body, timeout=300)
        return status, json.loads(text).get("text_output", text) if status == 200 else text
    body["stream"] = True
    status, text = http_post(f"{url}/v2/models/slora/generate_stream", body, timeout=300)
    events = sse_events(text)
    errors = [e["error"] for e in events if "error" in e]
    if errors:
        return 503, errors[0]
    return status, "".join(e["text_output"] for e in events)


def test_adapter_affinity_and_outputs(deployment, reference):
    url = deployment["url"]
    # The first use of each adapter, one at a time: Ray Serve learns where each one is loaded.
    for i, name in enumerate(ADAPTER_NAMES):
        status, text = call(url, PROMPTS[i % 3], name, stream=False)
        assert status == 200 and text == reference[(PROMPTS[i % 3], name)]
    time.sleep(1.0)  # replicas report their loaded adapters every 0.1 s
    cases = [(PROMPTS[i % 3], ADAPTER_NAMES[(i * 5) % 8], i % 4 == 0) for i in range(192)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: call(url, *c), cases))
    for (prompt, lora, stream), (status, text) in zip(cases, results):
        assert status == 200, text
        assert text == reference[(prompt, lora)], (prompt, lora, stream)

    served = {r["replica_id"]: {a: requests_served(r["http_url"], a) for a in ADAPTER_NAMES}
              for r in replicas(deployment["state"])}
    assert len(served) == 2
    total = sum(n for counts in served.values() for n in counts.values())
    assert total == len(ADAPTER_NAMES) + len(cases)  # every request counted by an engine
    first_uses = sum(n > 0 for counts in served.values() for n in counts.values())
    on_holder = (total - first_uses) / (total - len(ADAPTER_NAMES))
    assert on_holder >= 0.95, served
    # Both replicas took adapters (the router spreads new adapters over the replicas).
    assert all(any(counts.values()) for counts in served.values()), served


def test_base_model_and_bad_requests(deployment, reference):
    url = deployment["url"]
    assert call(url, PROMPTS[0], None, stream=True) == (200, reference[(PROMPTS[0], None)])
    status, text = http_post(f"{url}/v2/models/slora/generate",
                             {"text_input": "x", "max_tokens": 2, "lora_name": "missing"})
    assert status >= 400 and "NOT_FOUND" in text
    status, text = http_post(f"{url}/v2/models/slora/generate", b"[1, 2]")
    assert status == 400 and "INVALID_ARG" in text
    status, text = http_post(f"{url}/v2/models/other/generate", {"text_input": "x"})
    assert status == 404 and "NOT_FOUND" in text


def test_killed_replica_loses_no_request_silently(deployment, reference):
    url = deployment["url"]
    victim = replicas(deployment["state"])[0]
    cases = [(PROMPTS[i % 3], ADAPTER_NAMES[i % 8], i % 2 == 0) for i in range(32)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, url, *c) for c in cases]
        time.sleep(0.5)
        ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
        results = [f.result(timeout=300) for f in futures]  # nothing hangs
    ok = 0
    for (prompt, lora, stream), (status, text) in zip(cases, results):
        if status == 200:
            assert text == reference[(prompt, lora)], (prompt, lora, stream)
            ok += 1
        else:  # failed, and says why
            assert status == 503 and "UNAVAILABLE: replica died" in text, (status, text)
    assert ok >= len(cases) // 2, results
    # The survivor (and the replacement Ray Serve starts) keep serving.
    wait_for(lambda: call(url, PROMPTS[0], ADAPTER_NAMES[0], stream=False)[0] == 200,
             timeout=120, what="serving after the kill")
