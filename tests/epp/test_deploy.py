"""The Kubernetes manifests in ``deploy/`` and the Dockerfile: parsed, cross-checked, and the
EPP arguments accepted by ``kvaware epp`` itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kvaware_scorer.cli import build_parser
from kvaware_scorer.scheduler import Scheduler

from .conftest import ROOT

DEPLOY = ROOT / "deploy"


def _docs() -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["kind"], path
            assert doc["metadata"]["name"], path
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def test_every_manifest_is_listed_and_complete() -> None:
    """Each manifest parses with apiVersion, kind and name, and the kustomization lists them."""
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    kinds = {k for k, _ in _docs()}
    assert {"Deployment", "Service", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
            "InferencePool", "HTTPRoute"} <= kinds  # fmt: skip


def test_deployment_runs_kvaware_epp_with_valid_flags() -> None:
    """The container's arguments parse as ``kvaware epp`` arguments; ports, probes, the
    config mount and the grace period agree with them."""
    docs = _docs()
    dep = docs[("Deployment", "kvaware-epp")]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = build_parser().parse_args(["epp", *c["args"]])
    assert args.pool_name == "vllm-pool" and args.config_file == Path("/config/config.yaml")
    ports = {p["containerPort"] for p in c["ports"]}
    assert {args.grpc_port, args.grpc_health_port, args.metrics_port} <= ports
    assert c["readinessProbe"]["grpc"] == {"port": args.grpc_health_port, "service": "readiness"}
    assert c["livenessProbe"]["grpc"]["service"] == "liveness"
    drain = float(args.drain_timeout.rstrip("s"))
    assert pod["terminationGracePeriodSeconds"] > drain
    assert pod["serviceAccountName"] == "kvaware-epp"
    mount = c["volumeMounts"][0]
    assert str(args.config_file).startswith(mount["mountPath"])
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert (("ConfigMap", vol["configMap"]["name"])) in docs
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = docs[("Service", "kvaware-epp")]
    assert svc["spec"]["selector"].items() <= labels.items()


def test_pool_names_the_epp_service_and_rbac_covers_the_watches() -> None:
    """The InferencePool points at the EPP Service's ext_proc port (http2); the Role allows
    watching Pods and InferencePools; the route targets the pool."""
    docs = _docs()
    pool = docs[("InferencePool", "vllm-pool")]["spec"]
    assert pool["selector"]["matchLabels"] and pool["targetPorts"][0]["number"] == 8000
    ref = pool["endpointPickerRef"]
    svc = docs[("Service", ref["name"])]
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert port["appProtocol"] == "http2" and port["targetPort"] == 9002
    rules = docs[("Role", "kvaware-epp")]["rules"]
    for group, resource in (("", "pods"), ("inference.networking.k8s.io", "inferencepools")):
        (rule,) = [r for r in rules if resource in r["resources"]]
        assert group in rule["apiGroups"] and {"get", "list", "watch"} <= set(rule["verbs"])
    binding = docs[("RoleBinding", "kvaware-epp")]
    assert binding["roleRef"]["name"] == "kvaware-epp"
    assert binding["subjects"][0]["name"] == "kvaware-epp"
    route = docs[("HTTPRoute", "llm-route")]
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert (backend["kind"], backend["name"]) == ("InferencePool", "vllm-pool")


def test_configmap_holds_a_loadable_endpoint_picker_config() -> None:
    """The ConfigMap's EndpointPickerConfig builds a scheduler."""
    cm = _docs()[("ConfigMap", "kvaware-epp-config")]
    scheduler = Scheduler.from_config(cm["data"]["config.yaml"])
    try:
        assert "precise-prefix-cache-scorer" in scheduler.plugins
    finally:
        scheduler.close()


def test_dockerfile_runs_kvaware_epp_with_the_extra() -> None:
    """The image installs the epp extra and its entrypoint is ``kvaware epp``."""
    text = (ROOT / "Dockerfile").read_text()
    assert ".[epp" in text
    assert 'ENTRYPOINT ["kvaware", "epp"]' in text
    assert "EXPOSE 9002 9003 9090" in text
