"""``slora-ray``: N replicas of slora-triton behind Ray Serve, each with its own tritonserver.

    slora-ray --replicas 2 --base-model /models/llama --adapter-root /srv/adapters \\
        --gpus-per-replica 1 -- --device cuda --dtype bfloat16

Arguments after ``--`` go to each replica's launcher (``slora-serve``). With ``--address`` the
deployment joins a running Ray cluster (``ray start --head`` on one node, ``ray start
--address=HEAD:6379`` on the others); otherwise a local one is started.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .deployment import RayServeOptions, build_app
from .triton_process import LaunchOptions


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher_args = []
    if "--" in argv:
        at = argv.index("--")
        argv, launcher_args = argv[:at], argv[at + 1:]
    p = argparse.ArgumentParser(prog="slora-ray", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--base-model", default="smollm2")
    p.add_argument("--adapter-root", help="adapter directory every replica can read")
    p.add_argument("--max-adapters-per-replica", type=int, default=64)
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--gpus-per-replica", type=float, default=0.0)
    p.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    p.add_argument("--host", default="0.0.0.0", help="address of the HTTP ingress")
    p.add_argument("--port", type=int, default=8000, help="port of the HTTP ingress")
    p.add_argument("--log-dir", help="each replica's tritonserver log goes here")
    p.add_argument("--state-dir", help="each replica writes its URLs here (<replica>.json)")
    return p.parse_args(argv), launcher_args


def options_from_args(args: argparse.Namespace, launcher_args: list[str]) -> RayServeOptions:
    launch = LaunchOptions(base_model=args.base_model, adapter_root=args.adapter_root,
                           launcher_args=tuple(launcher_args), log_dir=args.log_dir)
    return RayServeOptions(num_replicas=args.replicas,
                           max_adapters_per_replica=args.max_adapters_per_replica,
                           max_attempts=args.max_attempts, replica_num_cpus=args.cpus_per_replica,
                           replica_num_gpus=args.gpus_per_replica, state_dir=args.state_dir,
                           launch=launch)


def main(argv: list[str] | None = None) -> None:
    args, launcher_args = parse_args(argv)
    options = options_from_args(args, launcher_args)
    import ray
    from ray import serve

    ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(options), name="slora", route_prefix="/")
    print(f"slora on Ray Serve: {options.num_replicas} replicas; "
          f"POST http://{args.host}:{args.port}/v2/models/slora/generate[_stream]", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()


if __name__ == "__main__":
    main()
