"""AsyncLLM: streams ``max_tokens`` one-token deltas per request; holds back a request whose
adapter is not among those running while ``max_loras`` distinct adapters run (as vLLM's
scheduler does). Environment:
- FAKE_VLLM_RECORD: a file to append one JSON line per engine (its arguments, environment and,
  at shutdown, every request it served and the most distinct adapters running at once);
- FAKE_VLLM_BUILD_S (0), FAKE_VLLM_TTFT_S (0.01), FAKE_VLLM_TOKEN_S (0.002): delays.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

from vllm.sampling_params import RequestOutputKind


@dataclass
class CompletionOutput:
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False


class AsyncLLM:
    def __init__(self, args, usage_context) -> None:
        self.args = args
        self.usage_context = usage_context
        self.requests: list[dict] = []
        self.running: dict[str, int] = {}  # adapter name -> running requests
        self.max_running_loras = 0
        self.changed = asyncio.Condition()
        a = args
        lora = SimpleNamespace(max_loras=a.max_loras, max_lora_rank=a.max_lora_rank,
                               max_cpu_loras=a.max_cpu_loras or a.max_loras,
                               target_modules=a.lora_target_modules) if a.enable_lora else None
        self.vllm_config = SimpleNamespace(
            scheduler_config=SimpleNamespace(max_num_seqs=a.max_num_seqs,
                                             max_num_batched_tokens=a.max_num_batched_tokens,
                                             async_scheduling=True),
            cache_config=SimpleNamespace(enable_prefix_caching=a.enable_prefix_caching,
                                         num_gpu_blocks=1000),
            model_config=SimpleNamespace(enforce_eager=a.enforce_eager),
            compilation_config=SimpleNamespace(cudagraph_mode="CUDAGraphMode.FULL_AND_PIECEWISE"),
            lora_config=lora)

    @classmethod
    def from_engine_args(cls, args, usage_context=None) -> AsyncLLM:
        import time

        time.sleep(float(os.environ.get("FAKE_VLLM_BUILD_S", "0")))
        return cls(args, usage_context)

    async def generate(self, prompt, sampling_params, request_id, lora_request=None):
        p = sampling_params
        if lora_request is not None and not self.args.enable_lora:
            raise ValueError("LoRA is not enabled")
        if p.output_kind is not RequestOutputKind.DELTA:
            raise ValueError("the fake streams deltas only")
        name = lora_request.lora_name if lora_request else None
        self.requests.append({
            "request_id": request_id, "prompt_len": len(prompt["prompt_token_ids"]),
            "lora": None if lora_request is None else [lora_request.lora_name,
                                                       lora_request.lora_int_id,
                                                       lora_request.lora_path],
            "temperature": p.temperature, "max_tokens": p.max_tokens,
            "min_tokens": p.min_tokens, "ignore_eos": p.ignore_eos})
        if name is not None:
            async with self.changed:
                await self.changed.wait_for(
                    lambda: name in self.running or len(self.running) < self.args.max_loras)
                self.running[name] = self.running.get(name, 0) + 1
                self.max_running_loras = max(self.max_running_loras, len(self.running))
        try:
            await asyncio.sleep(float(os.environ.get("FAKE_VLLM_TTFT_S", "0.01")))
            token_s = float(os.environ.get("FAKE_VLLM_TOKEN_S", "0.002"))
            for k in range(p.max_tokens):
                last = k == p.max_tokens - 1
                yield RequestOutput(request_id, [CompletionOutput([7], "length" if last else None)],
                                    finished=last)
                if not last:
                    await asyncio.sleep(token_s)
        finally:
            if name is not None:
                async with self.changed:
                    self.running[name] -= 1
                    if not self.running[name]:
                        del self.running[name]
                    self.changed.notify_all()

    def shutdown(self) -> None:
        record = os.environ.get("FAKE_VLLM_RECORD")
        if not record:
            return
        env = {k: os.environ.get(k) for k in ("PYTHONPATH", "VLLM_WORKER_MULTIPROC_METHOD",
                                               "VLLM_USE_FLASHINFER_SAMPLER", "VIRTUAL_ENV")}
        line = {"engine_args": self.args.kwargs, "usage_context": self.usage_context.name,
                "env": env, "python": sys.executable, "requests": self.requests,
                "max_running_loras": self.max_running_loras}
        with open(record, "a") as f:
            f.write(json.dumps(line) + "\n")
