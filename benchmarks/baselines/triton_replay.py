"""Replay a trace through tritonserver: gRPC bidirectional streaming into the ``slora`` ensemble.

Each request is sent at its arrival time on one of ``num_streams`` open streams (concurrency is
whatever the arrivals make it), with ``stream=True`` and ``ignore_eos=True`` so every request
streams exactly ``output_len`` tokens. The prompt is text whose tokenization has exactly the
trace's prompt length (``benchmarks.prompts``). The first response carrying text is the first
token; the response flagged ``triton_final_response`` ends the request.

The server is the caller's: a URL, or one started here by ``start_server`` with the project's
launcher (``slora_backend.serve``) on the same adapter root. For a server started here the row
also gives the server's own p50 / p90 of the engine model's time to first token and of the first
response's wait to be sent (``server_ttft_*``, ``server_first_response_delay_*``), read off its
Prometheus histograms over the replay (``server_histograms.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from slora_backend.serving.metrics import FIRST_RESPONSE_DELAY_NAME, TTFT_NAME

from ..adapter_sets import model_spec, write_registry
from ..metrics import Recorder
from ..prompts import text_prompts, write_word_tokenizer
from ..workload import Workload, paced
from . import server_histograms
from .replay_note import replay_summary

MODEL = "slora"


def _inputs(prompt: str, max_tokens: int, lora_name: str | None) -> list[Any]:
    import tritonclient.grpc as grpcclient

    def tensor(name: str, value: Any, dtype: str, np_dtype: Any) -> Any:
        t = grpcclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(np.array([value], dtype=np_dtype))
        return t

    inputs = [
        tensor("text_input", prompt.encode(), "BYTES", np.object_),
        tensor("max_tokens", max_tokens, "INT32", np.int32),
        tensor("stream", True, "BOOL", np.bool_),
        tensor("ignore_eos", True, "BOOL", np.bool_),
        tensor("exclude_input_in_output", True, "BOOL", np.bool_),
    ]
    if lora_name:
        inputs.append(tensor("lora_name", lora_name.encode(), "BYTES", np.object_))
    return inputs


class _StreamState:
    """Per-request last seen counts (a final response may come without outputs)."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.tokens: dict[str, int] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.reasons: dict[str, str] = {}
        self.errors: list[str] = []

    def callback(self, result: Any, error: Any) -> None:
        now = time.perf_counter()
        if error is not None:
            # tritonclient hands stream errors over without the request id.
            self.errors.append(str(error))
            return
        response = result.get_response()
        rid = response.id
        count = result.as_numpy("num_output_tokens")
        if count is not None and count.size:
            self.tokens[rid] = int(count.reshape(-1)[0])
            self.recorder.token(rid, self.tokens[rid], now)
        prompt = result.as_numpy("num_input_tokens")
        if prompt is not None and prompt.size:
            self.prompt_tokens[rid] = int(prompt.reshape(-1)[0])
        reason = result.as_numpy("finish_reason")
        if reason is not None and reason.size:
            text = reason.reshape(-1)[0]
            text = text.decode() if isinstance(text, bytes) else str(text)
            if text:
                self.reasons[rid] = text
        final = response.parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            self.recorder.finish(rid, self.reasons.get(rid, "length"), self.tokens.get(rid, 0), now)


def replay(workload: Workload, url: str, prompts: list[str], *, slo_s: float,
           use_adapters: bool = True, time_limit_s: float | None = None, num_streams: int = 2,
           idle_timeout_s: float = 120.0, model: str = MODEL) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient

    requests = workload.requests if use_adapters else workload.without_adapters().requests
    if len(prompts) != len(requests):
        raise ValueError(f"{len(requests)} requests need as many prompts, got {len(prompts)}")
    recorder = Recorder()
    state = _StreamState(recorder)
    clients = [grpcclient.InferenceServerClient(url) for _ in range(max(1, num_streams))]
    if not clients[0].is_model_ready(model):  # raises when nothing listens at the url
        raise RuntimeError(f"model {model!r} is not ready at {url}")
    for c in clients:
        c.start_stream(callback=state.callback)
    inputs = [_inputs(p, r.output_len, r.adapter) for p, r in zip(prompts, requests)]
    start = time.perf_counter() + 0.05
    deadline = start + time_limit_s if time_limit_s else None
    try:
        for i, req, arrival in paced(requests, start, time_limit_s):
            rid = f"r{i}"
            recorder.submitted(rid, arrival, req.output_len)
            clients[i % len(clients)].async_stream_infer(
                model, inputs[i], request_id=rid, enable_empty_final_response=True)
        truncated = not _wait(recorder, state, deadline, idle_timeout_s)
        cut_at = time.perf_counter()  # completions count up to here (see engine_replay.py)
        if truncated:
            for c in clients:
                c.stop_stream(cancel_requests=True)
    finally:
        for c in clients:
            c.stop_stream()
            c.close()
    open_ids = recorder.open_ids()
    reason = "time_limit" if truncated else "error"
    for rid in open_ids:
        recorder.finish(rid, reason)
    finished = [r.finished for r in recorder.records.values()
                if r.finish_reason in ("length", "stop", "abort")]
    end = max(finished, default=start) if not truncated or recorder.stalled else cut_at
    result = {
        "system": "slora_triton",
        "label": f"S-LoRA through tritonserver (gRPC streaming, model {model!r})",
        **replay_summary(recorder, requests_in_trace=len(requests), start=start, end=end,
                         truncated=truncated, slo_s=slo_s, time_limit_s=time_limit_s,
                         idle_timeout_s=idle_timeout_s, silence="response",
                         open_requests="cancelled"),
        "stream_errors": len(state.errors),
        # the server's count of prompt tokens vs the trace's: text prompts must tokenize exactly
        "prompt_len_mismatches": sum(
            1 for i, r in enumerate(requests)
            if f"r{i}" in state.prompt_tokens and state.prompt_tokens[f"r{i}"] != r.prompt_len),
        "first_stream_error": state.errors[0] if state.errors else None,
        "triton_streams": len(clients),
    }
    return result


def _wait(recorder: Recorder, state: _StreamState, deadline: float | None,
          idle_timeout_s: float) -> bool:
    """Until every request ended; requests that errored (no id) are counted off at the end."""
    while True:
        if len(recorder.open_ids()) <= len(state.errors):
            return True
        if deadline is not None and time.perf_counter() >= deadline:
            return False
        step = min(time.perf_counter() + 0.5, deadline or float("inf"))
        if not recorder.wait(step, idle_timeout_s) and recorder.stalled:
            return False


def start_server(*, base_model: str, tokenizer: Path, adapter_root: Path, device: str,
                 dtype: str, engine_params: dict[str, str], log_file: Path,
                 ready_timeout_s: float = 600.0) -> Any:
    """A tritonserver on free ports serving ``adapter_root`` (its registry.json is read at start)."""
    from slora_backend.launcher import ServeOptions, TritonServer, free_ports

    http, grpc, metrics = free_ports(3)
    options = ServeOptions(
        base_model=base_model, tokenizer=str(tokenizer), adapter_root=str(adapter_root),
        http_port=http, grpc_port=grpc, metrics_port=metrics, host="127.0.0.1", device=device,
        dtype=dtype, engine_params=dict(engine_params),
        tritonserver_args=["--exit-timeout-secs=20"],
    )
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.unlink(missing_ok=True)  # the launcher appends, and reads the log for fatal errors
    server = TritonServer(options, log_file=log_file)
    server.start()
    try:
        server.wait_ready(ready_timeout_s)
    except Exception:
        server.stop()
        raise
    return server


# ---- the harness's Triton row -----------------------------------------------------------------


def tokenizer_dir(args: Any, base_model: str) -> Path:
    """``--tokenizer`` as given, or a word-level tokenizer matching the model's vocabulary."""
    if args.tokenizer and args.tokenizer != "word":
        return Path(args.tokenizer)
    vocab = model_spec(base_model).vocab_size
    return write_word_tokenizer(Path(args.cache) / f"word-tokenizer-{vocab}", vocab)


def run(args, workload: Workload, base_model: str, kwargs: dict[str, Any],
        adapter_root: Path | None, log=print) -> dict[str, Any]:
    """The harness's Triton row: start a server (or use ``--triton-url``), warm it, replay."""
    from transformers import AutoTokenizer

    tok_dir = tokenizer_dir(args, base_model)
    prompts = text_prompts(workload.requests, AutoTokenizer.from_pretrained(tok_dir), args.seed)
    server = None
    url = args.triton_url
    if url is None:
        if adapter_root is not None:
            write_registry(adapter_root, [a.name for a in workload.adapters])
        params = {k: str(v) for k, v in kwargs.items()
                  if k not in ("base_model", "device", "dtype") and v is not None}
        params["stream_interval"] = str(args.triton_stream_interval)
        log_file = Path(args.triton_log or (Path(args.cache) / "tritonserver.log"))
        t0 = time.perf_counter()
        server = start_server(
            base_model=base_model, tokenizer=tok_dir, adapter_root=adapter_root,
            device=args.device, dtype=args.dtype, engine_params=params, log_file=log_file,
            ready_timeout_s=args.triton_ready_timeout)
        url = server.grpc_url
        log(f"  tritonserver ready at {url} in {time.perf_counter() - t0:.1f} s (log {log_file})")
    try:
        log(f"[{workload.config.setting} n={workload.config.num_adapters}] through tritonserver "
            f"{url}")
        _triton_warm_up(url, workload)
        histograms = SERVER_HISTOGRAMS.values()
        before = server_histograms.scrape(server.metrics_url, histograms) if server else None
        result = replay(workload, url, prompts, slo_s=args.slo, time_limit_s=args.time_limit,
                        num_streams=args.triton_streams)
        if before is not None:
            after = server_histograms.scrape(server.metrics_url, histograms)
            result.update(_server_quantiles(before, after))
        result["triton_url"] = url
        result["stream_interval"] = None if args.triton_url else args.triton_stream_interval
        result["tokenizer"] = str(tok_dir)
        return result
    finally:
        if server is not None:
            server.stop()


# The server's own account of a request's first token (``slora_backend.serving.metrics``):
# the engine model's time to first token, and the wait of the first response to be sent.
# Result key prefix -> histogram.
SERVER_HISTOGRAMS = {"server_ttft": TTFT_NAME,
                     "server_first_response_delay": FIRST_RESPONSE_DELAY_NAME}


def _server_quantiles(before: dict, after: dict) -> dict[str, float | None]:
    """p50 / p90 of the server's histograms over the replay (``server_ttft_p50_s``, ...)."""
    out: dict[str, float | None] = {}
    for key, name in SERVER_HISTOGRAMS.items():
        for q in (50, 90):
            value = server_histograms.quantile(before[name], after[name], q / 100)
            out[f"{key}_p{q}_s"] = None if value is None else round(value, 4)
    return out


def _triton_warm_up(url: str, workload: Workload) -> None:
    """One short request per rank through the server, so kernels are compiled before timing."""
    import dataclasses

    by_rank: dict[int, str] = {}
    for a in workload.adapters:
        by_rank.setdefault(a.rank, a.name)
    reqs = tuple(dataclasses.replace(workload.requests[0], arrival_s=0.0, adapter=name,
                                     prompt_len=8, output_len=4) for name in by_rank.values())
    warm = dataclasses.replace(workload, requests=reqs)
    replay(warm, url, [" warm up"] * len(reqs), slo_s=60.0, time_limit_s=120.0, num_streams=1)
