"""``slora-client``: stream answers to the terminal and manage adapters.

    slora-client generate "What is the capital of France?" --lora pirate
    slora-client adapters list
    slora-client adapters load my-adapter [relative/path/under/root]
    slora-client adapters load-dir team-a --adapter-root /srv/adapters   # every adapter in it
    slora-client adapters unload my-adapter
    slora-client adapters describe pirate
    slora-client stats
    slora-client --json generate "Hi" --lora pirate     # one JSON object, for scripts

``--json`` (before the command): every result is one JSON object on stdout (``generate``: the
text, finish reason and token counts at the end, nothing streamed), and an error is one JSON
object ``{"error": {"code": ..., "message": ...}}`` on stderr, with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .bulk import load_directory, with_progress
from .client import SLoRAClient
from .errors import SLoRAClientError


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_adapters(adapters: list[dict[str, Any]]) -> None:
    if not adapters:
        print("no adapters registered (a name under the adapter root loads on first use)")
        return
    header = ("NAME", "RANK", "TARGETS", "SIZE", "RESIDENCY", "ACTIVE", "TOTAL")
    rows = [(a["name"], str(a.get("rank", "")), ",".join(a.get("target_modules", [])),
             _size(int(a.get("size_bytes", 0))), a.get("residency", ""),
             str(a.get("active_requests", 0)), str(a.get("total_requests", 0)))
            for a in adapters]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slora-client", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("SLORA_URL", "localhost:8001"),
                   help="gRPC address of the server (default localhost:8001, or $SLORA_URL)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per call")
    p.add_argument("--admin-token", default=os.environ.get("SLORA_ADMIN_TOKEN") or None,
                   help="the server's admin token, for adapters load / unload "
                        "(default $SLORA_ADMIN_TOKEN)")
    p.add_argument("--json", dest="json_output", action="store_true",
                   help="machine-readable output: one JSON object per command (errors too)")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream an answer")
    g.add_argument("prompt")
    g.add_argument("--lora", "--lora-name", dest="lora_name", default=None,
                   help="adapter name (default: the base model)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", default=None)
    g.add_argument("--raw", action="store_true",
                   help="send the prompt as it is (default: as a user turn of the chat template)")
    g.add_argument("--model", default="slora", help="model to call (default: the ensemble)")
    g.add_argument("--stats", action="store_true",
                   help="print finish reason and token counts to stderr at the end")

    a = sub.add_parser("adapters", help="list / load / unload / describe adapters")
    a.add_argument("action", choices=("list", "load", "load-dir", "unload", "describe"))
    a.add_argument("name", nargs="?", help="the adapter; for load-dir: a directory under the "
                   "adapter root ('.' for the root itself)")
    a.add_argument("path", nargs="?", help="for load: directory under the adapter root "
                                           "(default: the name)")
    a.add_argument("--json", action="store_true", help="print the raw JSON result (as the "
                                                           "global --json)")

    a.add_argument("--adapter-root", type=Path,
                   default=Path(os.environ.get("SLORA_ADAPTER_ROOT", "demo_adapters")),
                   help="for load-dir: the server's adapter root as this machine sees it "
                        "(default $SLORA_ADAPTER_ROOT or ./demo_adapters)")
    sub.add_parser("stats", help="engine, pool and adapter statistics (JSON)")
    return p


def _print_json(value: Any, stream=None) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False), file=stream or sys.stdout)


def _generate_json(generation, lora_name: str | None) -> dict[str, Any]:
    completion = generation.result()
    return {"text": completion.text, "finish_reason": completion.finish_reason,
            "num_input_tokens": completion.num_input_tokens,
            "num_output_tokens": completion.num_output_tokens, "lora_name": lora_name}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = SLoRAClient(args.url, timeout=args.timeout, admin_token=args.admin_token)
    try:
        if args.command == "generate" and args.json_output:
            generation = client.generate(
                args.prompt, lora_name=args.lora_name, max_tokens=args.max_tokens,
                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                stop=args.stop, ignore_eos=args.ignore_eos, chat=not args.raw, model=args.model)
            _print_json(_generate_json(generation, args.lora_name))
        elif args.command == "generate":
            generation = client.generate(
                args.prompt, lora_name=args.lora_name, max_tokens=args.max_tokens,
                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                stop=args.stop, ignore_eos=args.ignore_eos, chat=not args.raw, model=args.model)
            try:
                for delta in generation:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                generation.cancel()
                print("\n[cancelled]", file=sys.stderr)
                return 130
            sys.stdout.write("\n")
            sys.stdout.flush()
            if args.stats:
                print(f"[finish_reason={generation.finish_reason} "
                      f"input_tokens={generation.num_input_tokens} "
                      f"output_tokens={generation.num_output_tokens}]", file=sys.stderr)
        elif args.command == "adapters":
            if args.action != "list" and not args.name:
                print(f"slora-client adapters {args.action}: name the adapter", file=sys.stderr)
                return 2
            if args.action == "list":
                result: Any = client.list_adapters()
                if not (args.json or args.json_output):
                    _print_adapters(result)
                    return 0
            elif args.action == "load":
                result = with_progress(f"loading {args.name}",
                                       lambda: client.load_adapter(args.name, args.path), sys.stderr)
            elif args.action == "load-dir":
                results = load_directory(client.load_adapter, args.adapter_root, args.name,
                                         sys.stderr)
                if args.json or args.json_output:
                    _print_json(results)
                return 0 if all(r["ok"] for r in results) else 1
            elif args.action == "unload":
                result = client.unload_adapter(args.name)
            else:
                result = client.describe_adapter(args.name)
            _print_json(result)
        elif args.command == "stats":
            _print_json(client.stats())
    except SLoRAClientError as e:
        if args.json_output:
            _print_json({"error": {"code": e.code, "message": e.message}}, sys.stderr)
        else:
            print(f"error ({e.code}): {e.message}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
