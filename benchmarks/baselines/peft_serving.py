"""Baseline (a): transformers + PEFT served the way the S-LoRA paper ran it.

The paper's loop (its ``run_exp_peft.py``): take every request that has arrived, group the queue
by adapter (first-arrival order), and for each group swap its adapter in, run padded batches of at
most ``max_batch_size`` requests (prompts padded to the batch's longest, decoding until the
batch's longest output; a request is done when its own output length is reached), then swap the
adapter out. PEFT cannot hold thousands of adapters at once, so adapters are loaded from disk with
``load_adapter`` and dropped with ``delete_adapter`` per group. Greedy decoding with a KV cache.

This is slow by design; ``time_limit_s`` stops it between batches and ``max_requests`` replays a
prefix of the trace (same distribution, same arrival times). The result says which it did.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..metrics import Recorder, summarize
from ..workload import Workload

PAPER_MAX_BATCH = 6  # the paper's PEFT runs ("peft easily OOM, manually set this max batch size")


def load_base(base_model: str, device: str, dtype: str) -> Any:
    """The base model as a transformers LlamaForCausalLM: random weights of a named shape
    (``random:<shape>``, built on the device) or a Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch_dtype = getattr(torch, dtype)
    if base_model.startswith("random:"):
        from slora_backend.model_loader import random_config

        config = random_config(base_model.split(":", 1)[1])
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch_dtype).to(device)
    return model.eval()


class _PeftSwapper:
    """One adapter active at a time; others loaded from disk on demand and deleted after use."""

    def __init__(self, base: Any, adapter_root: Path) -> None:
        self.base = base
        self.root = adapter_root
        self.model: Any = None
        self.loads = 0

    def activate(self, name: str) -> Any:
        from peft import PeftModel

        path = str(self.root / name)
        with warnings.catch_warnings():  # deprecation chatter of the installed transformers
            warnings.simplefilter("ignore", FutureWarning)
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
            else:
                self.model.load_adapter(path, adapter_name=name)
                self.model.set_adapter(name)
        self.loads += 1
        return self.model

    def release(self, name: str) -> None:
        self.model.delete_adapter(name)


def _run_batch(model: Any, batch: list[tuple[str, Any]], vocab: int, device: str,
               recorder: Recorder, rng: np.random.RandomState, sync) -> None:
    """One padded batch: same-length random prompts (as the paper's dummy prompts), greedy
    decoding to the longest output; each request finishes at its own output length."""
    import torch

    prompt_len = max(r.prompt_len for _, r in batch)
    steps = max(r.output_len for _, r in batch)
    ids = torch.as_tensor(rng.randint(3, vocab, (len(batch), prompt_len)), device=device)
    open_ids = list(batch)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        for produced in range(1, steps + 1):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            token.cpu()  # the step's tokens reach the host (as a server would stream them)
            now = time.perf_counter()
            still = []
            for rid, r in open_ids:
                recorder.token(rid, produced, now)
                if produced >= r.output_len:
                    recorder.finish(rid, "length", produced, now)
                else:
                    still.append((rid, r))
            open_ids = still
            if produced == steps:
                break
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
    sync()


def replay(workload: Workload, base_model: str, adapter_root: Path, *, device: str = "cpu",
           dtype: str = "float16", max_batch_size: int = PAPER_MAX_BATCH,
           time_limit_s: float | None = None, max_requests: int | None = None,
           slo_s: float = 6.0, seed: int = 0, log=print) -> dict[str, Any]:
    import torch

    cuda = device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    t0 = time.perf_counter()
    base = load_base(base_model, device, dtype)
    vocab = base.config.vocab_size
    swapper = _PeftSwapper(base, adapter_root)
    log(f"  peft: base model ready in {time.perf_counter() - t0:.1f} s")
    requests = list(workload.requests[:max_requests] if max_requests else workload.requests)
    pending = [(f"r{i}", r) for i, r in enumerate(requests)]
    recorder = Recorder()
    rng = np.random.RandomState(seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    batches = swaps = 0
    start = time.perf_counter()
    deadline = start + time_limit_s if time_limit_s else None
    stopped = False
    while pending and not stopped:
        now = time.perf_counter() - start
        ready = [(rid, r) for rid, r in pending if r.arrival_s <= now]
        if not ready:
            time.sleep(max(0.0, min(pending[0][1].arrival_s - now, 0.5)))
            continue
        taken = {rid for rid, _ in ready}
        pending = [p for p in pending if p[0] not in taken]
        groups: OrderedDict[str, list] = OrderedDict()
        for rid, r in ready:
            recorder.submitted(rid, start + r.arrival_s, r.output_len)
            groups.setdefault(r.adapter, []).append((rid, r))
        for name, group in groups.items():
            if deadline is not None and time.perf_counter() >= deadline:
                stopped = True
                break
            model = swapper.activate(name) if name is not None else base
            swaps += name is not None
            for i in range(0, len(group), max_batch_size):
                if deadline is not None and time.perf_counter() >= deadline:
                    stopped = True
                    break
                _run_batch(model, group[i:i + max_batch_size], vocab, device, recorder, rng, sync)
                batches += 1
            if name is not None:
                swapper.release(name)
    end = time.perf_counter()
    for rid in recorder.open_ids():
        recorder.finish(rid, "time_limit")
    # A run stopped early is judged on the requests that arrived before it stopped.
    planned = len(recorder.records) if stopped else len(requests)
    result = {
        "system": "peft",
        "label": f"(a) transformers + PEFT, adapter swapped per group, batches of <= {max_batch_size}",
        **summarize(recorder, planned=planned, start=start, end=end, slo_s=slo_s),
        "requests_in_trace": len(workload.requests),
        "peft_batches": batches,
        "peft_adapter_swaps": swaps,
        "peft_max_batch_size": max_batch_size,
        "truncated": stopped or len(requests) < len(workload.requests),
    }
    notes = []
    if len(requests) < len(workload.requests):
        notes.append(f"replayed the first {len(requests)} of {len(workload.requests)} requests")
    if stopped:
        notes.append(f"stopped at the {time_limit_s:g} s limit after {len(recorder.records)} "
                     f"requests had arrived")
    if notes:
        result["note"] = "; ".join(notes) + " (same trace, same distribution)"
    if cuda:
        result["gpu_max_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del swapper, base
    return result
