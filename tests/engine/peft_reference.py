"""Greedy generation with transformers + PEFT, one prompt at a time: the engine's reference."""

from __future__ import annotations

from pathlib import Path

import torch


class PeftReference:
    """One base model with several PEFT adapters attached; switches adapter per prompt."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path]) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        base.eval()
        self.model = None
        if adapters:
            names = list(adapters)
            self.model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
            for name in names[1:]:
                self.model.load_adapter(adapters[name], adapter_name=name)
        self.base = base

    def _run(self, adapter: str | None, fn):
        if self.model is None:
            return fn(self.base)
        if adapter is None:
            with self.model.disable_adapter():
                return fn(self.model)
        self.model.set_adapter(adapter)
        return fn(self.model)

    @torch.no_grad()
    def logits(self, ids: list[int], adapter: str | None) -> torch.Tensor:
        return self._run(adapter, lambda m: m(torch.tensor([ids])).logits[0, -1].float())

    @torch.no_grad()
    def greedy(self, ids: list[int], adapter: str | None, max_tokens: int) -> list[int]:
        """Greedy tokens with the KV cache; EOS is an ordinary token (like ignore_eos)."""

        def run(model) -> list[int]:
            out: list[int] = []
            x, past = torch.tensor([ids]), None
            for _ in range(max_tokens):
                res = model(x, past_key_values=past, use_cache=True)
                past = res.past_key_values
                out.append(int(torch.argmax(res.logits[0, -1])))
                x = torch.tensor([[out[-1]]])
            return out

        return self._run(adapter, run)
