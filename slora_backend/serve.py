"""One command to serve: ``python -m slora_backend.serve`` (console script ``slora-serve``).

It prepares the base model (the embedded SmolLM2-135M-Instruct by default, converted once and
cached), picks the adapter root, writes a copy of ``model_repository/`` whose ``slora_engine``
parameters carry the flags, lays out the Python backend with the stub for this Python, starts
tritonserver with the environment the stub needs (``triton_utils``), waits until it is ready and
prints how to call it.

Why a generated copy of the repository rather than environment variables: the effective settings
are then what Triton itself reports (``GET /v2/models/slora_engine/config``), the committed
repository stays usable as it is (``tritonserver --model-repository=model_repository``), and
nothing reaches the models except through their ``config.pbtxt``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .triton_utils import TritonInstall, build_backend_dir, find_tritonserver, stub_environment

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SOURCE_REPOSITORY = PROJECT_ROOT / "model_repository"
DEMO_ADAPTERS = PROJECT_ROOT / "demo_adapters"
ENGINE_MODEL = "slora_engine"
MODELS = ("slora_engine", "slora_adapters", "slora")


# ---- config.pbtxt parameters -------------------------------------------------------------------

_PARAM_RE = r'(\{{\s*key:\s*"{key}"\s*value\s*:?\s*\{{\s*string_value:\s*)"((?:[^"\\]|\\.)*)"'


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def set_parameters(pbtxt: str, values: Mapping[str, str]) -> str:
    """Set string parameters in a config.pbtxt text: existing keys are rewritten in place, new
    ones appended to the ``parameters [ ... ]`` list (created if the file has none)."""
    missing = []
    for key, value in values.items():
        pattern = re.compile(_PARAM_RE.format(key=re.escape(key)))
        pbtxt, n = pattern.subn(lambda m, v=value: m.group(1) + _quote(v), pbtxt)
        if n == 0:
            missing.append(key)
    if missing:
        entries = ",\n".join(
            f'  {{ key: "{k}" value {{ string_value: {_quote(values[k])} }} }}' for k in missing
        )
        match = re.search(r"^parameters\s*\[", pbtxt, flags=re.M)
        if match is None:
            pbtxt = pbtxt.rstrip() + f"\nparameters [\n{entries}\n]\n"
        else:
            end = pbtxt.index("]", match.end())
            body = pbtxt[match.end():end].rstrip()
            sep = "," if body.strip() else ""
            pbtxt = pbtxt[:match.end()] + body + sep + "\n" + entries + "\n" + pbtxt[end:]
    return pbtxt


def read_parameters(pbtxt: str) -> dict[str, str]:
    found = re.findall(
        r'\{\s*key:\s*"([^"]+)"\s*value\s*:?\s*\{\s*string_value:\s*"((?:[^"\\]|\\.)*)"', pbtxt)
    return {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in found}


def write_repository(dest: Path, engine_params: Mapping[str, str],
                     common_params: Mapping[str, str], source: Path = SOURCE_REPOSITORY) -> Path:
    """Copy the three models from ``source`` into ``dest`` (replacing what is there) with the
    given parameters set; ``common_params`` go to both Python models."""
    for model in MODELS:
        if not (source / model / "config.pbtxt").is_file():
            raise FileNotFoundError(f"{source} has no model {model!r} (no config.pbtxt)")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for model in MODELS:
        shutil.copytree(source / model, dest / model,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (dest / model / "1").mkdir(exist_ok=True)  # an ensemble needs its (empty) version dir
        config = dest / model / "config.pbtxt"
        text = config.read_text()
        if model == ENGINE_MODEL:
            text = set_parameters(text, {**engine_params, **common_params})
        elif model == "slora_adapters":  # checks adapter names against the engine's root itself
            root = {k: v for k, v in engine_params.items() if k == "adapter_root"}
            text = set_parameters(text, {**common_params, **root})
        config.write_text(text)
    return dest


# ---- options -------------------------------------------------------------------------------------


@dataclass
class ServeOptions:
    base_model: str = "smollm2"
    tokenizer: str | None = None
    adapter_root: str | None = None
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "0.0.0.0"
    device: str = "auto"
    dtype: str = "auto"
    kernel_backend: str | None = None
    pool_pages: int | None = None
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    max_tokens_limit: int | None = None
    engine_params: dict[str, str] = field(default_factory=dict)  # any other EngineConfig field
    work_dir: str | None = None
    source_repository: str = str(SOURCE_REPOSITORY)
    log_verbose: int = 0
    tritonserver_args: list[str] = field(default_factory=list)

    def engine_parameters(self) -> dict[str, str]:
        params = {
            "base_model": resolve_base_model(self.base_model),
            "tokenizer": _abs(self.tokenizer) if self.tokenizer else "",
            "adapter_root": str(resolve_adapter_root(self.adapter_root)),
            "device": self.device,
            "dtype": self.dtype,
            "kernel_backend": self.kernel_backend or "",
            "pool_pages": _opt(self.pool_pages),
            "max_num_seqs": _opt(self.max_num_seqs),
            "max_model_len": _opt(self.max_model_len),
            "max_tokens_limit": _opt(self.max_tokens_limit),
        }
        params.update(self.engine_params)
        return params


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


def _abs(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def resolve_base_model(base_model: str) -> str:
    """``smollm2`` (the default) -> its cached HF directory, converting it on first use; a GGUF
    file or HF directory -> its absolute path; ``random:<shape>`` unchanged."""
    if base_model == "smollm2":
        from .default_model import smollm2_dir

        return str(smollm2_dir())
    if base_model.startswith("random:"):
        return base_model
    path = Path(base_model).expanduser().resolve()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SystemExit(f"--base-model: GGUF file {path} does not exist")
    elif not (path / "config.json").is_file():
        raise SystemExit(
            f"--base-model: {path} is neither a GGUF file nor a Hugging Face directory "
            "(config.json, *.safetensors and the tokenizer)"
        )
    return str(path)


def resolve_adapter_root(adapter_root: str | None) -> Path:
    """The given root (created if missing), or the checkout's ``demo_adapters/`` when writable
    (``registry.json`` is written there and git-ignored), else a copy of it in the cache."""
    if adapter_root:
        root = Path(adapter_root).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return root
    if DEMO_ADAPTERS.is_dir() and os.access(DEMO_ADAPTERS, os.W_OK):
        return DEMO_ADAPTERS
    from .default_model import cache_root

    root = cache_root() / "adapters"
    root.mkdir(parents=True, exist_ok=True)
    if DEMO_ADAPTERS.is_dir():
        for src in DEMO_ADAPTERS.iterdir():
            if (src / "adapter_config.json").is_file() and not (root / src.name).exists():
                shutil.copytree(src, root / src.name)
    return root


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (the OS picks them)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


# ---- the server process ----------------------------------------------------------------------------


class ServerError(RuntimeError):
    pass


class TritonServer:
    """A tritonserver on a generated copy of the model repository.

    ``start()`` prepares and launches it in its own process group; ``wait_ready()`` polls
    ``/v2/health/ready``; ``stop()`` ends the whole group (the server and its backend stubs).
    """

    def __init__(self, options: ServeOptions, log_file: str | Path | None = None,
                 install: TritonInstall | None = None) -> None:
        self.options = options
        self.log_file = Path(log_file) if log_file else None
        self.install = install
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.work_dir: Path | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.options.metrics_port}/metrics"

    @property
    def repository(self) -> Path:
        assert self.work_dir is not None
        return self.work_dir / "model_repository"

    def prepare(self) -> list[str]:
        """Write the repository and backend dir; returns the tritonserver command line."""
        o = self.options
        for name, port in (("--http-port", o.http_port), ("--grpc-port", o.grpc_port),
                           ("--metrics-port", o.metrics_port)):
            if not port_is_free(port):
                raise ServerError(f"{name} {port} is in use (another tritonserver?); pick another")
        self.install = self.install or find_tritonserver()
        if o.work_dir:
            self.work_dir = Path(o.work_dir).expanduser().resolve()
            self.work_dir.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="slora-serve-")
            self.work_dir = Path(self._tmp.name)
        common = {"python_path": str(PROJECT_ROOT)}
        write_repository(self.repository, o.engine_parameters(), common,
                         Path(o.source_repository))
        backends = build_backend_dir(self.install, self.work_dir / "backends")
        return [
            str(self.install.server),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--http-port={o.http_port}", f"--http-address={o.host}",
            f"--grpc-port={o.grpc_port}", f"--grpc-address={o.host}",
            f"--metrics-port={o.metrics_port}", f"--metrics-address={o.host}",
            f"--log-verbose={o.log_verbose}",
            *o.tritonserver_args,
        ]

    def start(self) -> TritonServer:
        command = self.prepare()
        env = stub_environment(self.install, extra_pythonpath=[PROJECT_ROOT])
        out = open(self.log_file, "ab") if self.log_file else None
        try:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT
                                            if out else None, start_new_session=True)
        finally:
            if out:
                out.close()
        return self

    def wait_ready(self, timeout: float = 600.0) -> None:
        assert self.process is not None, "start() first"
        url = f"http://{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"tritonserver exited with code {code} before it was ready"
                                  + self._log_hint())
            fatal = self._fatal_log_line()
            if fatal:
                raise ServerError(f"tritonserver cannot start a model: {fatal}" + self._log_hint())
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s" + self._log_hint())

    # Failures after which tritonserver keeps waiting instead of exiting.
    FATAL_LOG_PATTERNS = ("error while loading shared libraries", "is not healthy",
                          "Failed to initialize Python stub")

    def _fatal_log_line(self) -> str | None:
        if not (self.log_file and self.log_file.is_file()):
            return None
        for line in self.log_file.read_text(errors="replace").splitlines():
            if any(p in line for p in self.FATAL_LOG_PATTERNS):
                return line.strip()
        return None

    def _log_hint(self) -> str:
        if self.log_file and self.log_file.is_file():
            tail = self.log_file.read_text(errors="replace").splitlines()[-40:]
            return "\n--- server log (last lines) ---\n" + "\n".join(tail)
        return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server's process group (tritonserver unloads the models, which finalize),
        then SIGKILL whatever is left after ``timeout``, and wait until every process of the
        group has exited: the stubs and the engine process hold the GPU's memory until then,
        and a server or engine started right after would find it taken."""
        p = self.process
        code = None
        if p is not None:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            _signal_group(p.pid, signal.SIGKILL)  # stubs that outlived the server
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
            wait_group_exit(p.pid, 30.0)
            code = p.returncode
            self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return code

    def __enter__(self) -> TritonServer:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the group this launcher created with start_new_session
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running. Zombies do not count: they hold no
    memory, and one whose parent died waits on a reaper that a container may lack."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True  # no /proc to tell zombies apart: alive as far as we can tell
    for stat in proc.glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # the process exited while we looked
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def wait_group_exit(pgid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s until no process of group ``pgid`` runs; whether none does."""
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---- command line ------------------------------------------------------------------------------------


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
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs one engine spans (tensor parallelism; default 1)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-tokens-limit", type=int,
                   help="largest max_tokens a request may ask for (default: the context length)")
    p.add_argument("--engine-param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other EngineConfig field, e.g. --engine-param block_tokens=32")
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
    if args.tensor_parallel_size != 1:
        extra["tensor_parallel_size"] = str(args.tensor_parallel_size)
    return ServeOptions(
        base_model=args.base_model, tokenizer=args.tokenizer, adapter_root=args.adapter_root,
        http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        host=args.host, device=args.device, dtype=args.dtype, kernel_backend=args.kernel_backend,
        pool_pages=args.pool_pages, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, max_tokens_limit=args.max_tokens_limit,
        engine_params=extra, work_dir=args.work_dir, source_repository=args.model_repository,
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
