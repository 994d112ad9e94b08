"""``slora-serve``: the launcher's command line.

It prepares the base model (the embedded SmolLM2-135M-Instruct by default, converted once and
cached), picks the adapter root, starts tritonserver on a copy of ``model_repository/`` whose
``slora_engine/1/engine.json`` carries the engine flags, waits until it is ready and prints how
to call it; Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from .options import (
    ADMIN_TOKEN_ENV,
    SOURCE_REPOSITORY,
    ServeOptions,
    resolve_adapter_root,
    resolve_base_model,
)
from .server import ServerError, TritonServer


def how_to_call(server: TritonServer, adapter_root: Path) -> str:
    names = sorted(p.name for p in adapter_root.iterdir()
                   if (p / "adapter_config.json").is_file()) if adapter_root.is_dir() else []
    example = names[0] if names else "<adapter>"
    body = json.dumps({"text_input": "What is the capital of France?", "max_tokens": 64,
                       "stream": True, "apply_chat_template": True, "lora_name": example})
    return "\n".join([
        "",
        f"slora-triton is serving (tritonserver {server.install.source}):",
        f"  gRPC     {server.grpc_url}     HTTP {server.http_url}     metrics {server.metrics_url}",
        "  models   slora (public ensemble), slora_adapters, slora_engine",
        f"  adapters {', '.join(names) or '(none yet)'}  under {adapter_root}",
        "",
        "Try:",
        f"  slora-client --url {server.grpc_url} generate 'What is the capital of France?'"
        f" --lora {example}",
        f"  slora-client --url {server.grpc_url} adapters list",
        f"  curl -N -X POST http://{server.http_url}/v2/models/slora/generate_stream -d '{body}'",
        f"  curl -s {server.metrics_url} | grep slora_",
        "Ctrl-C stops the server.",
        "",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="slora-serve",
        description="Serve an S-LoRA engine (many LoRA adapters of one base model) "
                    "through NVIDIA Triton Inference Server.",
    )
    p.add_argument("--base-model", default="smollm2",
                   help="HF directory (with its tokenizer), a .gguf file, random:<shape>, or "
                        "'smollm2' (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the base model's)")
    p.add_argument("--adapter-root",
                   help="directory of PEFT adapters; registry.json is kept there "
                        "(default: the checkout's demo_adapters/)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--host", default="0.0.0.0", help="address the endpoints listen on")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto",
                   help="float32, float16, bfloat16 or auto (float16 on CUDA, float32 on CPU)")
    p.add_argument("--kernel-backend", choices=("torch", "triton"))
    p.add_argument("--pool-pages", type=int, help="pages in the unified pool (default: sized "
                                                     "from free memory)")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--tensor-parallel-size", type=int,
                   help="GPUs one engine spans, from --device on (tensor parallelism; default 1)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-tokens-limit", type=int,
                   help="largest max_tokens a request may ask for (default: the context length)")
    p.add_argument("--engine-param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other engine.json key (an EngineConfig field or a serving setting), "
                        "VALUE as JSON, e.g. --engine-param block_tokens=32")
    p.add_argument("--admin-token", default=os.environ.get(ADMIN_TOKEN_ENV) or None,
                   help="require this token (input 'admin_token') for adapter load / unload / "
                        f"abort; generation stays open (default: ${ADMIN_TOKEN_ENV}, else none)")
    p.add_argument("--work-dir", help="where the generated model repository goes (default: a "
                                      "temporary directory removed at exit)")
    p.add_argument("--model-repository", default=str(SOURCE_REPOSITORY),
                   help="source model repository to copy")
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--log-file", help="write tritonserver's log here instead of the terminal")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--tritonserver-arg", action="append", default=[],
                   help="extra tritonserver argument, e.g. --tritonserver-arg=--exit-timeout-secs=10")
    return p.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    extra = {}
    for item in args.engine_param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--engine-param expects KEY=VALUE, got {item!r}")
        extra[key] = value
    return ServeOptions(
        base_model=args.base_model, tokenizer=args.tokenizer, adapter_root=args.adapter_root,
        http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        host=args.host, device=args.device, dtype=args.dtype, kernel_backend=args.kernel_backend,
        pool_pages=args.pool_pages, max_num_seqs=args.max_num_seqs,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_model_len, max_tokens_limit=args.max_tokens_limit,
        engine_params=extra, admin_token=args.admin_token, work_dir=args.work_dir,
        source_repository=args.model_repository,
        log_verbose=args.log_verbose, tritonserver_args=list(args.tritonserver_arg),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = options_from_args(args)
    print("slora-serve: preparing the base model and the adapter root ...", flush=True)
    options.base_model = resolve_base_model(options.base_model)
    adapter_root = resolve_adapter_root(options.adapter_root)
    options.adapter_root = str(adapter_root)
    server = TritonServer(options, log_file=args.log_file)
    try:
        server.start()
    except ServerError as e:
        print(f"slora-serve: {e}", file=sys.stderr)
        return 2
    print(f"slora-serve: started {server.install.describe()} (pid {server.process.pid}); "
          f"waiting until ready ...", flush=True)

    def _on_signal(signum, _frame):
        raise KeyboardInterrupt

    # SIGINT too: a shell without job control starts background commands with it ignored, and
    # Python then leaves it so - Ctrl-C (or a supervisor's SIGINT) would not stop the server.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        server.wait_ready(args.ready_timeout)
        print(how_to_call(server, adapter_root), flush=True)
        return server.process.wait()
    except ServerError as e:
        print(f"slora-serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("slora-serve: stopping ...", file=sys.stderr, flush=True)
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
