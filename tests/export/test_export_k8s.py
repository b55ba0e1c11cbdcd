"""`export k8s`: a DynamoGraphDeployment whose shape matches the CRD Dynamo 1.6.1 publishes.

Two references: the operator's v1beta1 Go types (field names and validation rules, restated below as a
small schema) and the DGD templates the ai-dynamo 1.6.1 wheel itself ships, which the manifest is
compared against key by key.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from supervisor.export import k8s
from supervisor.plan import render as planmod
from supervisor.profile import load as profiles

ROOT = Path(__file__).resolve().parents[2]
STATE = Path("/srv/state")

# From deploy/operator/api/v1beta1 (DynamoGraphDeploymentSpec, DynamoComponentDeploymentSharedSpec).
SPEC_FIELDS = {
    "providerOverride",
    "annotations",
    "labels",
    "priorityClassName",
    "components",
    "env",
    "backendFramework",
    "restart",
    "topologyConstraint",
    "experimental",
}
COMPONENT_FIELDS = {
    "providerOverride",
    "name",
    "type",
    "runtimeVersionOverride",
    "globalDynamoNamespace",
    "podTemplate",
    "replicas",
    "minAvailable",
    "multinode",
    "roles",
    "sharedMemorySize",
    "modelRef",
    "scalingAdapter",
    "eppConfig",
    "frontendSidecar",
    "dynamoSidecar",
    "compilationCache",
    "topologyConstraint",
    "experimental",
}
COMPONENT_TYPES = {"frontend", "worker", "prefill", "decode", "planner", "epp"}
COMPONENT_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?$")
DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
CONTAINER_FIELDS = {"name", "image", "command", "args", "env", "envFrom", "resources", "workingDir"}


def export(name: str, *overrides: str, **options: Any) -> k8s.Export:
    plan = planmod.render(
        profiles.load(name, overrides=overrides), state_root=STATE, python="/opt/py/bin/python"
    )
    return k8s.export(plan, **options)


def components(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in manifest["spec"]["components"]}


def main(component: dict[str, Any]) -> dict[str, Any]:
    (container,) = component["podTemplate"]["spec"]["containers"]
    return container


def env_of(component: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in main(component).get("env", [])}


def assert_valid_dgd(manifest: dict[str, Any]) -> None:
    """The CRD's structural rules that a hand-written manifest most often breaks."""
    assert manifest["apiVersion"] == "nvidia.com/v1beta1" and manifest["kind"] == "DynamoGraphDeployment"
    assert set(manifest) == {"apiVersion", "kind", "metadata", "spec"}
    assert DNS_NAME.match(manifest["metadata"]["name"]) and len(manifest["metadata"]["name"]) <= 63
    spec = manifest["spec"]
    assert set(spec) <= SPEC_FIELDS, set(spec) - SPEC_FIELDS
    assert spec.get("backendFramework", "vllm") in ("sglang", "vllm", "trtllm")
    comps = spec["components"]
    assert 1 <= len(comps) <= 25
    names = [c["name"] for c in comps]
    assert len({n.lower() for n in names}) == len(names), "names must be unique case-insensitively"
    for comp in comps:
        assert set(comp) <= COMPONENT_FIELDS, set(comp) - COMPONENT_FIELDS
        assert COMPONENT_NAME.match(comp["name"]) and len(comp["name"]) <= 63
        assert comp["type"] in COMPONENT_TYPES
        assert isinstance(comp["replicas"], int) and comp["replicas"] >= 0
        containers = comp["podTemplate"]["spec"]["containers"]
        assert [c["name"] for c in containers] == ["main"] and containers[0]["image"]
        container = containers[0]
        assert set(container) <= CONTAINER_FIELDS
        assert all(isinstance(a, str) for a in container["command"] + container["args"])
        for var in container.get("env", []):
            assert set(var) in ({"name", "value"}, {"name", "valueFrom"}) and isinstance(
                var.get("value", ""), str
            )
        for value in container.get("resources", {}).get("limits", {}).values():
            assert isinstance(value, str) and value.isdigit()  # quantities are strings in YAML


def shipped_template(engine: str, mode: str) -> dict[str, Any]:
    """A DGD template from the installed ai-dynamo wheel (the version the supervisor runs)."""
    spec = importlib.util.find_spec("dynamo")
    assert spec is not None and spec.submodule_search_locations, "ai-dynamo is not installed"
    path = (
        Path(next(iter(spec.submodule_search_locations)))
        / "profiler"
        / "templates"
        / "dgd"
        / engine
        / f"{mode}.yaml"
    )
    assert path.is_file(), f"ai-dynamo no longer ships {path}"
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize(
    ("name", "engine", "mode"),
    [("disagg", "vllm", "disagg"), ("agg", "vllm", "agg"), ("demo", "mocker", "disagg")],
)
def test_shape_matches_the_crd_and_dynamo_1_6_1_templates(name: str, engine: str, mode: str) -> None:
    manifest = export(name).manifest
    assert_valid_dgd(manifest)
    template = shipped_template(engine, mode)
    assert (manifest["apiVersion"], manifest["kind"]) == (template["apiVersion"], template["kind"])
    ours, theirs = components(manifest), components(template)
    assert sorted(c["type"] for c in ours.values()) == sorted(c["type"] for c in theirs.values())
    assert "Frontend" in ours and "Frontend" in theirs
    for comp in ours.values():
        twin = next(c for c in theirs.values() if c["type"] == comp["type"])
        assert set(comp) == set(twin)
        # Same container fields as upstream's, plus env (it uses envFrom for its HF token only).
        assert set(main(comp)) - {"env"} <= set(main(twin))
        assert main(comp)["command"][:2] == ["python3", "-m"]
        assert main(comp)["command"][2:] == main(twin)["command"][2:] or comp["type"] == "frontend"


def test_gpus_per_component_follow_the_workers() -> None:
    comps = components(
        export("disagg", "workers.prefill.gpus=[1,2]", "workers.prefill.tensor_parallel_size=2").manifest
    )
    assert "resources" not in main(comps["Frontend"])
    assert main(comps["decode"])["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert main(comps["prefill"])["resources"] == {"limits": {"nvidia.com/gpu": "2"}}
    assert all("resources" not in main(c) for c in components(export("demo").manifest).values())  # the mocker


def test_lmcache_env_and_kv_transfer_args_come_from_the_plan() -> None:
    plan = planmod.render(
        profiles.load("disagg", overrides=("lmcache.max_local_cpu_size=20",)), state_root=STATE
    )
    comps = components(k8s.export(plan).manifest)
    for proc in ("decode", "prefill"):
        spec, args = plan.process(proc), main(comps[proc])["args"]
        assert args == list(spec.argv[3:])  # every worker flag, --kv-transfer-config included
        kv = json.loads(args[args.index("--kv-transfer-config") + 1])
        assert kv == json.loads(spec.argv[spec.argv.index("--kv-transfer-config") + 1])
        lm = {k: v for k, v in env_of(comps[proc]).items() if k.startswith("LMCACHE_")}
        assert lm == {k: v for k, v in spec.env.items() if k.startswith("LMCACHE_")}
        assert env_of(comps[proc])["PYTHONHASHSEED"] == "0"
    assert env_of(comps["prefill"])["LMCACHE_MAX_LOCAL_CPU_SIZE"] == "20.0"
    assert (
        json.loads(
            main(comps["prefill"])["args"][main(comps["prefill"])["args"].index("--kv-transfer-config") + 1]
        )["kv_connector"]
        == "PdConnector"
    )
    assert not any(k.startswith("LMCACHE_") for k in env_of(comps["decode"]))  # NIXL only, as the plan says


def test_host_plumbing_is_left_to_the_operator() -> None:
    comps = components(export("disagg", 'discovery.backend="etcd"', 'discovery.event_plane="nats"').manifest)
    assert set(comps) == {"Frontend", "decode", "prefill"}  # no etcd / nats component
    for comp in comps.values():
        assert not set(env_of(comp)) & k8s.HOST_ENV
    args = main(comps["Frontend"])["args"]
    assert (
        "--http-host" not in args and "--http-port" not in args and args == ["--router-mode", "round-robin"]
    )


def test_secrets_become_secret_references() -> None:
    out = export(
        "disagg",
        'lmcache.remote.url="redis://user:hunter2@cache:6379"',
        'workers.prefill.env.HF_TOKEN="hf_abcdef"',
        'workers.decode.args=["--otlp-endpoint", "http://u:pw9@otel:4317"]',
        secret_name="llm-creds",
    )
    text = yaml.safe_dump(out.manifest)
    for secret in ("hunter2", "hf_abcdef", "pw9"):
        assert secret not in text
    prefill, decode = (components(out.manifest)[n] for n in ("prefill", "decode"))
    ref = {"secretKeyRef": {"name": "llm-creds", "key": "LMCACHE_REMOTE_URL"}}
    assert env_of(prefill)["LMCACHE_REMOTE_URL"] == ref
    assert env_of(prefill)["HF_TOKEN"] == {"secretKeyRef": {"name": "llm-creds", "key": "HF_TOKEN"}}
    args = main(decode)["args"]
    var = args[args.index("--otlp-endpoint") + 1]
    assert re.fullmatch(r"\$\(LMCS_DECODE_ARG_\d+\)", var)  # Kubernetes expands $(VAR) in args from env
    assert env_of(decode)[var[2:-1]] == {"secretKeyRef": {"name": "llm-creds", "key": var[2:-1]}}
    assert set(out.secret_keys) == {"LMCACHE_REMOTE_URL", "HF_TOKEN", var[2:-1]}
    assert any("kubectl create secret generic llm-creds" in n for n in out.notes)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args], check=False, capture_output=True, text=True, cwd=ROOT
    )


def test_cli_prints_yaml_and_notes_apart() -> None:
    result = run_cli(
        "export",
        "k8s",
        "disagg",
        "--image",
        "registry.local/dynamo:lmcache",
        "--namespace",
        "llm",
        "--set",
        'lmcache.remote.url="redis://:s3cret@cache:6379"',
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# DynamoGraphDeployment for Dynamo 1.6.1 (nvidia.com/v1beta1)")
    manifest = yaml.safe_load(result.stdout)
    assert_valid_dgd(manifest)
    assert manifest["metadata"]["namespace"] == "llm" and manifest["spec"]["backendFramework"] == "vllm"
    assert {main(c)["image"] for c in manifest["spec"]["components"]} == {"registry.local/dynamo:lmcache"}
    assert "s3cret" not in result.stdout + result.stderr
    assert (
        "kubectl create secret generic disagg-secrets --from-literal=LMCACHE_REMOTE_URL=..." in result.stderr
    )
    demo = run_cli("export", "k8s", "demo")
    assert demo.returncode == 0 and "the model is a path on this host" in demo.stderr
    assert "backendFramework" not in yaml.safe_load(demo.stdout)["spec"]  # the CRD's enum has no mocker
    assert run_cli("export", "k8s", "demo").stdout == demo.stdout  # deterministic


def test_cli_bad_input_is_one_line_exit_2() -> None:
    result = run_cli("export", "k8s", "disagg", "--set", "ports.base=true")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "lmcache-supervise: --set: ports.base: expected an integer, got True"
    ]


def test_lmcache_servers_are_not_exported_and_a_note_says_where_they_go() -> None:
    result = export("demo-lmcache")
    names = [c["name"] for c in result.manifest["spec"]["components"]]
    assert names == ["Frontend", "worker"]
    (note,) = [n for n in result.notes if "lmcache-server" in n]
    assert "not exported" in note and "lmcache.mp.host" in note
