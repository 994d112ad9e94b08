"""Kubernetes cannot run on the CI machines; these checks keep deploy/kubernetes/ honest: the
endpoint picker is told the metric names slora_engine exports (taken from the code), scrapes
Triton's metrics port, and its InferencePool selects the pods of the Deployment, whose ports and
launcher flags exist."""

from __future__ import annotations

from pathlib import Path

import tomllib
import yaml

from slora_backend.launcher.cli import parse_args
from slora_backend.serving.gateway_metrics import GATEWAY_METRIC_FLAGS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def documents(name: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    by_kind = {}
    for doc in docs:
        assert doc["kind"] not in by_kind, f"{name}: two {doc['kind']} documents"
        by_kind[doc["kind"]] = doc
    return by_kind


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def flags(args: list[str]) -> dict[str, str]:
    out = {}
    for arg in args:
        assert arg.startswith("--") and "=" in arg, f"EPP argument {arg!r} is not --flag=value"
        key, _, value = arg[2:].partition("=")
        out[key] = value
    return out


def test_endpoint_picker_maps_the_exported_metric_names():
    epp = flags(container(documents("inference-gateway.yaml")["Deployment"])["args"])
    for flag, name in GATEWAY_METRIC_FLAGS.items():
        assert epp.get(flag) == name, f"--{flag} should name {name}, the engine's export"


def test_endpoint_picker_scrapes_tritons_metrics_port_of_the_pool():
    gateway = documents("inference-gateway.yaml")
    serving = documents("slora-triton.yaml")
    server = container(serving["Deployment"])
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    epp = flags(container(gateway["Deployment"])["args"])
    assert int(epp["model-server-metrics-port"]) == ports["metrics"]
    assert epp["model-server-metrics-path"] == "/metrics"

    pool = gateway["InferencePool"]
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [ports["http"]]
    pod_labels = serving["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert epp["pool-name"] == pool["metadata"]["name"]
    picker = pool["spec"]["endpointPickerRef"]
    epp_service = gateway["Service"]
    assert picker["name"] == epp_service["metadata"]["name"]
    assert picker["port"]["number"] == int(epp["grpc-port"])
    assert epp_service["spec"]["selector"].items() <= (
        gateway["Deployment"]["spec"]["template"]["metadata"]["labels"].items())


def test_server_deployment_flags_and_service_ports():
    serving = documents("slora-triton.yaml")
    server = container(serving["Deployment"])
    options = parse_args(server["args"])  # the image's entrypoint is slora-serve
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert (options.http_port, options.grpc_port, options.metrics_port) == (
        ports["http"], ports["grpc"], ports["metrics"])
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    service = serving["Service"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    assert service["spec"]["selector"].items() <= (
        serving["Deployment"]["spec"]["template"]["metadata"]["labels"].items())
    version = tomllib.loads((DEPLOY.parents[1] / "pyproject.toml").read_text())["project"]["version"]
    assert server["image"].endswith(f":{version}")  # the image of this project version
    mounts = {m["mountPath"] for m in server["volumeMounts"]}
    assert {"/adapters", "/dev/shm"} <= mounts
