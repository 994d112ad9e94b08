"""The offline API: a list of prompts in, their finished outputs out, in order."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .config import SamplingParams
from .errors import InvalidRequestError
from .request import RequestOutput

if TYPE_CHECKING:
    from .engine import Engine


def generate(
    engine: Engine,
    prompts: Sequence[str | Sequence[int]],
    sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    lora_names: Sequence[str | None] | None = None,
) -> list[RequestOutput]:
    """Generate for every prompt (one sampling setting for all or one each; one adapter name, or
    None, per prompt). A prompt that ``add_request`` refuses raises; those queued before it run."""
    n = len(prompts)
    if isinstance(sampling_params, SamplingParams) or sampling_params is None:
        params = [sampling_params or SamplingParams()] * n
    else:
        params = list(sampling_params)
    names = list(lora_names) if lora_names is not None else [None] * n
    if len(params) != n or len(names) != n:
        raise InvalidRequestError(
            f"{n} prompts need {n} sampling params and lora names, got {len(params)} and {len(names)}")
    results: dict[str, RequestOutput] = {}
    done = threading.Event()

    def collect(out: RequestOutput) -> None:
        if out.finished:
            results[out.request_id] = out
            if len(results) == n:
                done.set()

    # One batch: the adapters are read first, or the scheduler (which passes over requests whose
    # adapter is still being read, to serve the others meanwhile) would start the batch in waves.
    engine.adapters.read_ahead(dict.fromkeys(n for n in names if n is not None))
    ids = [engine.add_request(p, sp, name, on_output=collect)
           for p, sp, name in zip(prompts, params, names)]
    if n:
        engine.run_until(done)
    return [results[i] for i in ids]
