"""The README's path, as a new user takes it: `python -m slora_backend.serve` brings up the
embedded SmolLM2-135M-Instruct with the demo adapters, the `slora-client` CLI streams answers that
differ by adapter (and equal the engine's own), lists the adapters, and Ctrl-C stops it all."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slora_backend import Engine, EngineConfig, SamplingParams
from slora_backend.launcher import free_ports

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DEMO_ADAPTERS = Path(os.environ.get("SLORA_DEMO_ADAPTERS", REPO / "demo_adapters"))
DEMO = ("pirate", "french", "json")
QUESTION = "What is the capital of France?"
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory) -> Path:
    missing = [n for n in DEMO if not (DEMO_ADAPTERS / n / "adapter_config.json").is_file()]
    assert not missing, (f"demo adapters {missing} missing under {DEMO_ADAPTERS}; "
                         "they are trained by scripts/train_demo_adapters.py and committed")
    root = tmp_path_factory.mktemp("demo") / "adapters"
    root.mkdir()
    for name in DEMO:
        shutil.copytree(DEMO_ADAPTERS / name, root / name)
    return root


@pytest.fixture(scope="module")
def launcher(tmp_path_factory, adapter_root):
    """`python -m slora_backend.serve` as a user runs it (ports changed to free ones)."""
    tmp = tmp_path_factory.mktemp("demo-server")
    http, grpc, metrics = free_ports(3)
    command = [sys.executable, "-m", "slora_backend.serve", "--adapter-root", str(adapter_root),
               "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
               "--host", "127.0.0.1", "--device", "cpu", "--log-file", str(tmp / "server.log"),
               "--tritonserver-arg=--exit-timeout-secs=20"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = []
    deadline = time.monotonic() + 300
    try:
        for line in proc.stdout:
            banner.append(line)
            if "Ctrl-C stops the server" in line:
                break
            assert time.monotonic() < deadline, "".join(banner)
        else:
            raise AssertionError("the launcher exited before it was ready:\n" + "".join(banner)
                                 + _tail(tmp / "server.log"))
        yield proc, f"127.0.0.1:{grpc}", "".join(banner)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _kill_server_group("".join(banner))  # (the launcher could not stop it)


def _kill_server_group(banner: str) -> None:
    """SIGKILL the process group of the tritonserver the launcher's banner names."""
    found = re.search(r"\(pid (\d+)\)", banner)
    if found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(found.group(1)), signal.SIGKILL)


def _tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-30:]) if path.exists() else ""


def cli(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slora_client.cli", "--url", url, *args],
                          capture_output=True, text=True, timeout=180)


def test_banner_says_how_to_call(launcher, adapter_root):
    _, url, banner = launcher
    assert url in banner
    assert "slora-client" in banner and "generate_stream" in banner
    assert all(name in banner for name in DEMO)
    assert str(adapter_root) in banner


def test_cli_answers_differ_by_adapter_and_equal_the_engine(launcher, adapter_root, smollm2):
    _, url, _ = launcher
    answers = {}
    for lora in (None, *DEMO):
        args = ["generate", QUESTION, "--max-tokens", str(MAX_TOKENS)]
        if lora:
            args += ["--lora", lora]
        run = cli(url, *args)
        assert run.returncode == 0, run.stderr
        answers[lora] = run.stdout.rstrip("\n")
    assert len(set(answers.values())) == len(answers), answers
    assert "Paris" in answers[None], answers[None]
    # Each demo adapter shows its style.
    assert answers["json"].lstrip().startswith("{"), answers["json"]
    assert any(w in answers["pirate"].lower() for w in ("arr", "matey", "ahoy")), answers["pirate"]
    assert any(w in f" {answers['french'].lower()} " for w in (" la ", " le ", " est ", " de ")), \
        answers["french"]

    # The same requests through the engine in-process give the same text.
    ref_root = adapter_root.parent / "ref-adapters"
    shutil.copytree(adapter_root, ref_root, ignore=shutil.ignore_patterns("registry.json"))
    engine = Engine(EngineConfig(base_model=str(smollm2), adapter_root=str(ref_root),
                                 kernel_backend="torch"))
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    loras = [None, *DEMO]
    outs = engine.generate([prompt] * len(loras), SamplingParams(max_tokens=MAX_TOKENS), loras)
    for lora, out in zip(loras, outs):
        assert answers[lora] == out.text, lora


def test_cli_adapter_commands(launcher):
    _, url, _ = launcher
    run = cli(url, "adapters", "list")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].split()[:2] == ["NAME", "RANK"]
    listed = {line.split()[0] for line in run.stdout.splitlines()[1:]}
    assert set(DEMO) <= listed  # loaded on first use by the previous test
    run = cli(url, "adapters", "describe", "pirate")
    assert run.returncode == 0 and '"rank"' in run.stdout
    run = cli(url, "adapters", "load", "pirate2", "pirate")
    assert run.returncode == 0, run.stderr
    run = cli(url, "adapters", "unload", "pirate2")
    assert run.returncode == 0 and "pirate2" in run.stdout
    run = cli(url, "generate", QUESTION, "--lora", "no-such-adapter")
    assert run.returncode == 1
    assert "error (NOT_FOUND)" in run.stderr and "no-such-adapter" in run.stderr


def test_ctrl_c_stops_everything(launcher):
    proc, url, _ = launcher
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    # Well within the 20 s exit timeout: no request (the refused ones included) kept a model
    # alive, i.e. the CLI read every stream to its end.
    assert time.monotonic() - start < 15
    run = cli(url, "stats")
    assert run.returncode == 1 and "UNAVAILABLE" in run.stderr  # nothing listens any more
