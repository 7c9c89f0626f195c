"""The Gateway API Inference Extension example (deploy/inference-pool.yaml) against the code: its
worker flags parse with the real CLI after the image's entrypoint, the pool targets the port the
worker serves HTTP on, and the metric names a default endpoint picker reads are among orcd's aliases."""
from __future__ import annotations

import json
import pathlib

import pytest

from orcd_grpc import cli, pool_metrics

yaml = pytest.importorskip("yaml")

REPO = pathlib.Path(__file__).resolve().parents[1]
#: what the EPP reads unless told otherwise (its Options defaults), by the protocol's metric
EPP_DEFAULTS = {"TotalQueuedRequests": "vllm:num_requests_waiting",
                "TotalRunningRequests": "vllm:num_requests_running",
                "KVCacheUtilization": "vllm:kv_cache_usage_perc"}


@pytest.fixture(scope="module")
def docs():
    return {d["kind"]: d for d in yaml.safe_load_all((REPO / "deploy" / "inference-pool.yaml").read_text()) if d}


def entrypoint() -> list[str]:
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT"):
            return json.loads(line.split(" ", 1)[1])
    raise AssertionError("no ENTRYPOINT")


def test_pool_targets_the_workers_http_port_and_selects_its_pods(docs):
    pod = docs["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ns = cli.build_parser().parse_args(entrypoint()[1:] + container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ns.http_port == ports["http"]
    pool = docs["InferencePool"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [ns.http_port]
    labels = pool["spec"]["selector"]["matchLabels"]
    assert labels.items() <= pod["metadata"]["labels"].items()
    assert {"name", "port"} <= set(pool["spec"]["endpointPickerRef"])
    ref = docs["HTTPRoute"]["spec"]["rules"][0]["backendRefs"][0]
    assert (ref["group"], ref["kind"], ref["name"]) == ("inference.networking.k8s.io", "InferencePool",
                                                        pool["metadata"]["name"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    allowed = docs["NetworkPolicy"]["spec"]["ingress"][0]["ports"]
    assert [p["port"] for p in allowed] == [ns.http_port]


def test_the_endpoint_pickers_default_metric_names_are_exported():
    aliases = {a for names in pool_metrics.ALIASES.values() for a in names}
    assert set(EPP_DEFAULTS.values()) <= aliases
