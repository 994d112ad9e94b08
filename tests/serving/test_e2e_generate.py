"""Generation through a real tritonserver: concurrent streams equal the engine, HTTP generate
endpoints, the asyncio client, cancellation draining the pool, and the custom metrics (with the
ones an inference gateway routes by)."""

from __future__ import annotations

import asyncio
import queue
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from slora_client import AsyncSLoRAClient, CancelledError, SLoRAClient

from slora_backend import Engine, EngineConfig, SamplingParams
from slora_backend.serving.gateway_metrics import (
    GATEWAY_METRIC_FLAGS,
    KV_CACHE_USAGE_METRIC,
    LORA_INFO_METRIC,
    MAX_LORA_LABEL,
    RUNNING_ADAPTERS_LABEL,
    RUNNING_REQUESTS_METRIC,
    WAITING_ADAPTERS_LABEL,
)
from tests.serving.conftest import (
    ADAPTERS,
    http_post,
    make_adapter_root,
    metric,
    running_server,
    scrape,
    server_options,
    sse_events,
    wait_for,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "Paris is the capital of",
    "1, 2, 3, 4,",
]
LORAS = [None, *ADAPTERS]  # the base model and every adapter
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gqa, adapter_pool):
    tmp = tmp_path_factory.mktemp("e2e-generate")
    root = make_adapter_root(adapter_pool, tmp / "adapters")
    with running_server(server_options(tiny_gqa, root), tmp / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_gqa, adapter_pool):
    """The same engine in-process (its own copy of the adapter root), for expected outputs."""
    root = make_adapter_root(adapter_pool, tmp_path_factory.mktemp("ref") / "adapters")
    return Engine(EngineConfig(base_model=str(tiny_gqa), adapter_root=str(root),
                               kernel_backend="torch"))


@pytest.fixture(scope="module")
def client(server):
    with SLoRAClient(server.grpc_url, timeout=120) as c:
        yield c


def _cases():
    return [(p, lora) for p in PROMPTS for lora in LORAS]


def _expected(reference, cases, max_tokens=MAX_TOKENS):
    outs = reference.generate([p for p, _ in cases], SamplingParams(max_tokens=max_tokens),
                              [lora for _, lora in cases])
    return {case: out for case, out in zip(cases, outs)}


def test_concurrent_streams_equal_engine_generate(client, reference):
    cases = _cases()
    assert len(cases) >= 16
    expected = _expected(reference, cases)
    # Outputs must differ by adapter, or the comparison below would not see a mix-up.
    assert len({expected[(PROMPTS[0], lora)].text for lora in LORAS}) >= 4

    results: dict = {}
    errors: list = []
    start = threading.Barrier(len(cases))

    def run(case):
        prompt, lora = case
        try:
            start.wait()
            generation = client.generate(prompt, lora_name=lora, max_tokens=MAX_TOKENS)
            deltas = list(generation)
            results[case] = (deltas, generation)
        except Exception as e:  # reported below with its case
            errors.append((case, e))

    threads = [threading.Thread(target=run, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for case in cases:
        deltas, generation = results[case]
        want = expected[case]
        assert "".join(deltas) == want.text, case
        assert generation.num_output_tokens == len(want.token_ids), case
        assert generation.finish_reason == want.finish_reason, case
        assert generation.num_input_tokens == want.num_prompt_tokens, case
        assert len(deltas) > 1, f"{case}: not streamed"


def test_async_client_many_streams_one_connection(server, reference):
    cases = _cases()[:10]
    expected = _expected(reference, cases)

    async def main():
        async with AsyncSLoRAClient(server.grpc_url, timeout=120) as client:
            gens = [client.generate(p, lora_name=lora, max_tokens=MAX_TOKENS) for p, lora in cases]
            return await asyncio.gather(*(g.result() for g in gens))

    for case, completion in zip(cases, asyncio.run(main())):
        assert completion.text == expected[case].text, case
        assert completion.finish_reason == expected[case].finish_reason


def test_engine_on_a_thread_of_the_stub_serves_the_same(tmp_path, tiny_gqa, adapter_pool,
                                                         reference):
    """``engine_process: "false"`` (the engine in the stub's own process, no child) still
    serves: concurrent streams equal the engine, and stats answer."""
    root = make_adapter_root(adapter_pool, tmp_path / "adapters")
    options = server_options(tiny_gqa, root, engine_params={"engine_process": "false"})
    cases = _cases()[:8]
    expected = _expected(reference, cases)
    with running_server(options, tmp_path / "server.log") as s, \
            SLoRAClient(s.grpc_url, timeout=120) as c:
        gens = [c.generate(p, lora_name=lora, max_tokens=MAX_TOKENS) for p, lora in cases]
        for case, gen in zip(cases, gens):
            assert "".join(gen) == expected[case].text, case
        stats = c.stats()
    assert stats["finished_requests"] == len(cases) and stats["pool_pages_kv"] == 0
    assert "engine_process=False" in (tmp_path / "server.log").read_text()


def test_engine_model_directly(client, reference):
    """slora_engine takes the same inputs (lora_name instead of the adapter step)."""
    prompt, lora = PROMPTS[3], "r16-attn-rs"
    want = _expected(reference, [(prompt, lora)])[(prompt, lora)]
    got = client.generate(prompt, lora_name=lora, max_tokens=MAX_TOKENS, model="slora_engine")
    assert "".join(got) == want.text


def test_http_generate_stream_and_generate(server, reference):
    prompt, lora = PROMPTS[1], "r32-all"
    want = _expected(reference, [(prompt, lora)])[(prompt, lora)]
    status, body = http_post(
        f"http://{server.http_url}/v2/models/slora/generate_stream",
        {"text_input": prompt, "max_tokens": MAX_TOKENS, "stream": True, "lora_name": lora})
    assert status == 200, body
    events = sse_events(body)
    assert len(events) > 1 and not any("error" in e for e in events), body
    assert "".join(e["text_output"] for e in events) == want.text
    assert events[-1]["finish_reason"] == want.finish_reason
    assert events[-1]["num_output_tokens"] == len(want.token_ids)

    # Non-streaming: one response; the prompt is included unless exclude_input_in_output.
    status, body = http_post(f"http://{server.http_url}/v2/models/slora/generate",
                             {"text_input": prompt, "max_tokens": MAX_TOKENS, "lora_name": lora})
    assert status == 200, body
    import json

    answer = json.loads(body)
    assert answer["text_output"] == prompt + want.text
    status, body = http_post(f"http://{server.http_url}/v2/models/slora/generate",
                             {"text_input": prompt, "max_tokens": MAX_TOKENS, "lora_name": lora,
                              "exclude_input_in_output": True})
    assert json.loads(body)["text_output"] == want.text


def test_sampling_seed_and_stop_words(client):
    kw = dict(lora_name="r8-qv", max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    a = client.complete(PROMPTS[0], **kw)
    b = client.complete(PROMPTS[0], **kw)
    assert a.text == b.text and a.num_output_tokens == b.num_output_tokens
    greedy = client.complete(PROMPTS[2], max_tokens=16, ignore_eos=True).text
    assert len(greedy) >= 8, greedy
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 3]
    stopped = client.complete(PROMPTS[2], max_tokens=16, ignore_eos=True, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == greedy[:greedy.index(stop)]  # the stop string itself is not returned


def _pool_idle(client):
    s = client.stats()
    return s if s["pool_pages_kv"] == 0 and s["num_running"] == 0 and s["in_flight"] == 0 \
        and s["num_waiting"] == 0 else None


def test_cancel_through_ensemble_drains_pool(client):
    wait_for(lambda: _pool_idle(client), what="an idle engine before the test")
    before = client.stats()["requests_cancelled"]
    generation = client.generate(PROMPTS[1], lora_name="r4-mlp", max_tokens=400, ignore_eos=True)
    it = iter(generation)
    for _ in range(3):
        next(it)
    busy = client.stats()
    assert busy["pool_pages_kv"] > 0 and busy["in_flight"] == 1, busy
    generation.cancel()
    with pytest.raises(CancelledError):
        for _ in it:  # deltas already on their way, then the CANCELLED end of the stream
            pass
    idle = wait_for(lambda: _pool_idle(client), what="the pool to drain after cancel")
    assert idle["requests_cancelled"] == before + 1
    assert generation.num_output_tokens < 400


def test_stop_stream_cancel_requests_drains_pool(server, client):
    """A stock tritonclient stream to slora_engine, cancelled with stop_stream: is_cancelled()
    reaches the engine model and the request's pages are freed."""
    wait_for(lambda: _pool_idle(client), what="an idle engine before the test")
    before = client.stats()["requests_cancelled"]
    responses: queue.Queue = queue.Queue()
    raw = grpcclient.InferenceServerClient(server.grpc_url)
    raw.start_stream(callback=lambda result, error: responses.put((result, error)))

    def tensor(name, dtype, value):
        t = grpcclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(np.array([value], dtype=np.object_ if dtype == "BYTES" else None))
        return t

    inputs = [tensor("text_input", "BYTES", PROMPTS[0].encode()),
              grpcclient.InferInput("max_tokens", [1], "INT32"),
              grpcclient.InferInput("stream", [1], "BOOL"),
              grpcclient.InferInput("ignore_eos", [1], "BOOL")]
    inputs[1].set_data_from_numpy(np.array([450], dtype=np.int32))
    inputs[2].set_data_from_numpy(np.array([True]))
    inputs[3].set_data_from_numpy(np.array([True]))
    raw.async_stream_infer("slora_engine", inputs, request_id="stop-stream-test")
    for _ in range(3):
        result, error = responses.get(timeout=60)
        assert error is None, error
    assert client.stats()["in_flight"] == 1
    raw.stop_stream(cancel_requests=True)
    raw.close()
    idle = wait_for(lambda: _pool_idle(client), what="the pool to drain after stop_stream")
    assert idle["requests_cancelled"] == before + 1


def test_metrics(server, client):
    for lora in LORAS * 2:  # (each adapter's second use finds it resident: a hit)
        client.complete(PROMPTS[0], lora_name=lora, max_tokens=4)
    # Metrics are refreshed every metrics_interval_s (0.5 s).
    values = wait_for(lambda: (v := scrape(server.metrics_url))
                      and metric(v, "slora_adapter_hits_total") > 0
                      and metric(v, "slora_pool_pages", use="kv") == 0 and v,
                      what="adapter hits and an idle pool in the metrics")
    stats = client.stats()
    assert metric(values, "slora_generated_tokens_total") > 0
    assert metric(values, "slora_finished_requests_total") >= len(LORAS)
    assert metric(values, "slora_time_to_first_token_seconds_count") >= len(LORAS)
    assert metric(values, "slora_time_to_first_token_seconds_bucket", le="+Inf") >= len(LORAS)
    # (streamed: a first response goes out before the final one)
    assert metric(values, "slora_first_response_delay_seconds_count") >= 1
    assert metric(values, "slora_pool_pages_total") == stats["pool_pages_total"]
    assert metric(values, "slora_pool_pages", use="adapter") > 0  # adapters stay resident
    assert metric(values, "slora_pool_pages", use="kv") == 0
    assert metric(values, "slora_adapters", residency="gpu") >= 1  # "gpu": resident in the pool
    assert metric(values, "slora_adapters", residency="registered") == len(ADAPTERS)
    assert metric(values, "slora_adapter_loads_total") >= len(ADAPTERS)
    assert 0 < metric(values, "slora_adapter_hit_ratio") <= 1
    for name in ("slora_requests_running", "slora_requests_waiting",
                 "slora_adapter_evictions_total", "slora_adapter_misses_total",
                 "slora_preemptions_total"):
        metric(values, name)  # exported


def _lora_info(text: str):
    """The gateway's view of the LoRA info gauge: its newest series (largest value), or None."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    family = families.get(LORA_INFO_METRIC)
    if family is None or not family.samples:
        return None
    return max(family.samples, key=lambda s: s.value), families


def test_gateway_metrics_name_running_adapters(server, client):
    """While streams run on two adapters, the scrape carries the gauges an inference gateway
    reads, under the names the gateway config maps, with those adapters in the LoRA info labels."""
    import time
    import urllib.request

    running = ["r8-qv", "r4-mlp"]
    stop = threading.Event()
    failures: list[BaseException] = []

    def keep_busy(lora):  # back-to-back long generations until the scrape has seen them
        try:
            while not stop.is_set():
                client.complete(PROMPTS[1], lora_name=lora, max_tokens=400, ignore_eos=True)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=keep_busy, args=(lora,)) for lora in running]
    for t in threads:
        t.start()

    def both_running():
        with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
            found = _lora_info(r.read().decode())
        if found is None:
            return None
        sample, families = found
        names = set(filter(None, sample.labels[RUNNING_ADAPTERS_LABEL].split(",")))
        return (sample, families) if names == set(running) else None

    try:
        sample, families = wait_for(both_running, timeout=120, interval=0.2,
                                    what="both adapters in the LoRA info gauge")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    assert not failures, failures
    assert families[LORA_INFO_METRIC].type == "gauge"
    assert set(sample.labels) >= {RUNNING_ADAPTERS_LABEL, WAITING_ADAPTERS_LABEL, MAX_LORA_LABEL}
    assert set(filter(None, sample.labels[WAITING_ADAPTERS_LABEL].split(","))) <= set(running)
    assert int(sample.labels[MAX_LORA_LABEL]) >= 1
    assert abs(sample.value - time.time()) < 60  # the value is the update's wall-clock time
    # Every metric the gateway config names is exported, as a gauge.
    for flag, name in GATEWAY_METRIC_FLAGS.items():
        assert name in families and families[name].type == "gauge", (flag, name)
    assert families[RUNNING_REQUESTS_METRIC].samples[0].value >= 0
    assert 0 <= families[KV_CACHE_USAGE_METRIC].samples[0].value <= 1
    # Once idle, no adapter is named running or waiting.
    def idle():
        with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
            sample, _ = _lora_info(r.read().decode())
        return not sample.labels[RUNNING_ADAPTERS_LABEL] and not sample.labels[WAITING_ADAPTERS_LABEL]
    wait_for(idle, timeout=60, what="an empty LoRA info gauge after the streams ended")
