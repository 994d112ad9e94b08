"""AsyncEngineArgs: only the fields vLLM 0.26 has that the harness may pass; vLLM's own checks
on the LoRA settings (an unknown keyword is a TypeError, as for vLLM's dataclass)."""

from __future__ import annotations

FIELDS = {
    "model": None, "load_format": "auto", "skip_tokenizer_init": False, "dtype": "auto",
    "seed": 0, "max_num_seqs": None, "max_num_batched_tokens": None,
    "enable_prefix_caching": None, "enforce_eager": False, "gpu_memory_utilization": 0.9,
    "attention_backend": None, "enable_lora": False, "max_lora_rank": 16, "max_loras": 1,
    "max_cpu_loras": None, "lora_target_modules": None, "max_model_len": None,
}
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class AsyncEngineArgs:
    def __init__(self, **kwargs) -> None:
        unknown = sorted(set(kwargs) - set(FIELDS))
        if unknown:
            raise TypeError(f"AsyncEngineArgs got unexpected keyword arguments {unknown}")
        self.kwargs = dict(kwargs)
        for key, default in FIELDS.items():
            setattr(self, key, kwargs.get(key, default))
        if self.enable_lora:
            if self.max_lora_rank not in MAX_LORA_RANKS:
                raise ValueError(f"max_lora_rank ({self.max_lora_rank}) must be one of "
                                 f"{MAX_LORA_RANKS}")
            if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
                raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras "
                                 f"({self.max_loras})")
