"""A stand-in for vLLM's API (the names benchmarks/baselines/vllm_replay.py uses), for testing
the harness's baseline (e) on a machine without vLLM: it records what it was given and streams
tokens with delays. Set by environment variables (see ``vllm.v1.engine.async_llm``)."""

from vllm.sampling_params import SamplingParams

__version__ = "0.0.0+fake"
__all__ = ["SamplingParams"]
