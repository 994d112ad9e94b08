"""Token choice per request: greedy, or temperature / top-k / top-p with a per-request seed.

No parameter combination can give NaN probabilities: temperatures are at least
``MIN_TEMPERATURE`` (``SamplingParams``), and a row's logits are shifted so their maximum is 0
before the division, so the softmax always has one term of exp(0). A row whose logits are
themselves not finite (a numerical fault of the model for that sequence) samples
``NON_FINITE`` instead of a token: that request ends with an error, its batch-mates go on.
"""

from __future__ import annotations

import torch

from .config import SamplingParams

NON_FINITE = -1  # the "token" of a row whose logits hold NaN or inf


class Sampler:
    """Samples one token per row of logits. Seeded requests own a generator, so the same seed
    gives the same tokens whatever else shares the batch."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._generators: dict[str, torch.Generator] = {}
        self._seeds = torch.Generator().manual_seed(seed)  # seeds for unseeded requests

    def sample(
        self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]
    ) -> list[int]:
        """logits: fp32 [rows, vocab]; returns one token id (or ``NON_FINITE``) per row."""
        return self.sample_on_device(logits, request_ids, params).tolist()

    def sample_on_device(
        self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]
    ) -> torch.Tensor:
        """As ``sample``, but the tokens stay on logits' device (int64 [rows]): no host sync."""
        finite = torch.isfinite(logits).all(dim=-1)
        tokens = torch.argmax(logits, dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        for i in sampled_rows:
            # (a non-finite row samples from zeros instead: multinomial must never see NaN,
            # which on CUDA is a device-side assert that ends the process)
            row = logits[i].masked_fill(~finite[i], 0.0)
            tokens[i] = self._sample_row(row, params[i], self._generator(request_ids[i], params[i]))
        return torch.where(finite, tokens, NON_FINITE)

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            seed = params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
            gen = torch.Generator(device=self.device).manual_seed(seed % 2**63)
            self._generators[request_id] = gen
        return gen

    @staticmethod
    def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> torch.Tensor:
        logits = (logits - logits.max()) / p.temperature  # <= 0, the maximum exactly 0
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= p.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=gen)[0]
