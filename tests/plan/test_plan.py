"""What matters in each built-in profile's plan, asserted whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.errors import PlanError
from supervisor.plan import render as planmod
from supervisor.plan.spec import Condition, Role
from supervisor.profile import load as profiles

ROOT = Path(__file__).resolve().parents[2]
STATE = Path("/srv/state")
LMCACHE = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
NIXL = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
PD = {
    "kv_connector": "PdConnector",
    "kv_role": "kv_both",
    "kv_connector_extra_config": {"connectors": [LMCACHE, NIXL]},
    "kv_connector_module_path": "kvbm.vllm_integration.connector",
}


def render(name: str, *overrides: str):
    return planmod.render(
        profiles.load(name, overrides=overrides), state_root=STATE, python="/opt/py/bin/python"
    )


def flag(argv: tuple[str, ...], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def kv_config(argv: tuple[str, ...]):
    value = flag(argv, "--kv-transfer-config")
    return None if value is None else json.loads(value)


def test_builtin_profiles_are_listed() -> None:
    assert set(profiles.builtin_names()) >= {
        "agg",
        "disagg",
        "agg-nolmcache",
        "disagg-nolmcache",
        "demo",
        "demo-agg",
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # name: [(process, role, --disaggregation-mode, kv-transfer-config, CUDA_VISIBLE_DEVICES, loads LMCache)]
        ("agg", [("worker", "agg", "agg", LMCACHE, "0", True)]),
        ("agg-nolmcache", [("worker", "agg", "agg", None, "0", False)]),
        (
            "disagg",
            [
                ("decode", "decode", "decode", NIXL, "0", False),
                ("prefill", "prefill", "prefill", PD, "1", True),
            ],
        ),
        (
            "disagg-nolmcache",
            [
                ("decode", "decode", "decode", NIXL, "0", False),
                ("prefill", "prefill", "prefill", NIXL, "1", False),
            ],
        ),
    ],
)
def test_vllm_profiles(name: str, expected: list) -> None:
    plan = render(name)
    assert [p.name for p in plan.processes] == ["frontend"] + [e[0] for e in expected]
    frontend = plan.processes[0]
    assert frontend.argv[:3] == ("/opt/py/bin/python", "-m", "dynamo.frontend")
    assert flag(frontend.argv, "--http-host") == "127.0.0.1"
    for spec, (proc, role, mode, kv, gpus, loads) in zip(plan.processes[1:], expected):
        assert spec.name == proc and spec.role == Role(role)
        assert spec.argv[1:3] == ("-m", "dynamo.vllm")
        assert flag(spec.argv, "--disaggregation-mode") == mode
        assert kv_config(spec.argv) == kv
        assert spec.env["CUDA_VISIBLE_DEVICES"] == gpus
        assert spec.loads_lmcache is loads
        assert ("LMCACHE_CHUNK_SIZE" in spec.env) is loads
        assert "--connector" not in spec.argv and "--is-prefill-worker" not in spec.argv
        if loads:
            assert spec.env["LMCACHE_TRACK_USAGE"] == "false"
            assert spec.env["LMCACHE_LOCAL_CPU"] == "true"
            assert spec.env["LMCACHE_MAX_LOCAL_CPU_SIZE"] == "5.0"
        if role != "agg":
            assert "--disable-hybrid-kv-cache-manager" in spec.argv
            assert spec.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
            assert int(spec.env["VLLM_NIXL_SIDE_CHANNEL_PORT"]) == spec.ports["nixl"]


def test_disagg_order_and_conditions() -> None:
    plan = render("disagg")
    decode, prefill = plan.process("decode"), plan.process("prefill")
    assert plan.processes[0].depends_on == ()
    assert [(d.name, d.condition) for d in decode.depends_on] == [("frontend", Condition.STARTED)]
    assert [(d.name, d.condition) for d in prefill.depends_on] == [
        ("frontend", Condition.STARTED),
        ("decode", Condition.HEALTHY),
    ]
    # The gate is the worker's own health endpoint, trusted only when the child owns the port.
    assert decode.probes.startup.check.url == f"http://127.0.0.1:{decode.ports['system']}/health"
    assert decode.probes.startup.check.json_field == "status"
    assert decode.probes.startup.check.owned_port == decode.ports["system"]
    assert decode.probes.startup.period_s <= 0.1
    assert (
        decode.probes.startup.period_s * decode.probes.startup.failure_threshold >= 600
    )  # a real load takes minutes


@pytest.mark.parametrize("name", ["agg", "disagg", "agg-nolmcache", "disagg-nolmcache", "demo", "demo-agg"])
def test_ports_and_multiproc_dirs_are_distinct(name: str) -> None:
    plan = render(name)
    ports = [p for spec in plan.processes for p in spec.ports.values()]
    if plan.deployment.metrics_port:
        ports.append(plan.deployment.metrics_port)
    assert len(ports) == len(set(ports))
    dirs = [spec.multiproc_dir for spec in plan.processes]
    assert len(dirs) == len(set(dirs))
    assert all(d.startswith(f"{STATE}/{plan.deployment.name}/prometheus/") for d in dirs)
    for spec in plan.processes:
        assert spec.env.get("PROMETHEUS_MULTIPROC_DIR") is None  # set by the runner, per start
        if spec.role.is_worker:
            assert int(spec.env["DYN_SYSTEM_PORT"]) == spec.ports["system"] <= 32767
            assert spec.env["PYTHONHASHSEED"] == "0"
            for host_var in (
                "DYN_SYSTEM_HOST",
                "DYN_TCP_RPC_HOST",
                "DYN_EVENT_PLANE_HOST",
                "DYN_TCP_RESPONSE_STREAM_HOST",
            ):
                assert spec.env[host_var] == "127.0.0.1"


def test_upstream_port_layout_for_base_8000() -> None:
    plan = render("disagg")
    assert plan.process("frontend").ports == {"http": 8000}
    assert plan.process("decode").ports["system"] == 8081
    assert plan.process("prefill").ports["system"] == 8082
    assert plan.deployment.metrics_port == 8090


def test_demo_is_mocker_on_loopback_with_local_model() -> None:
    plan = render("demo")
    d = plan.deployment
    assert d.engine == "mocker" and d.served_model_name == "demo"
    assert Path(d.model) == ROOT / "profiles" / "demo-model"
    assert (Path(d.model) / "tokenizer.json").is_file() and (Path(d.model) / "config.json").is_file()
    assert d.ready_url == "http://127.0.0.1:18000/v1/models/demo/ready"
    assert d.discovery == "file" and d.discovery_dir == f"{STATE}/demo/discovery"
    decode, prefill = plan.process("decode"), plan.process("prefill")
    for spec in (decode, prefill):
        assert spec.argv[1:3] == ("-m", "dynamo.mocker") and spec.gpus == ()
        assert "CUDA_VISIBLE_DEVICES" not in spec.env
        assert spec.env["DYN_SYSTEM_STARTING_HEALTH_STATUS"] == "ready"
        assert spec.env["HF_HUB_OFFLINE"] == "1"
        assert spec.env["DYN_FILE_KV"] == d.discovery_dir
        assert not spec.loads_lmcache
    assert flag(decode.argv, "--disaggregation-mode") == "decode"
    assert flag(prefill.argv, "--disaggregation-mode") == "prefill"
    # Dynamo's synchronous KV handoff, as with vLLM: no bootstrap rendezvous (docs/reliability.md)
    assert "--bootstrap-ports" not in prefill.argv and "bootstrap" not in prefill.ports
    assert [dep.name for dep in prefill.depends_on if dep.condition is Condition.HEALTHY] == ["decode"]


def test_router_kv_adds_a_loopback_kv_events_endpoint() -> None:
    plan = render("disagg", 'frontend.router_mode="kv"')
    for name in ("decode", "prefill"):
        spec = plan.process(name)
        events = json.loads(flag(spec.argv, "--kv-events-config"))
        assert events["endpoint"] == f"tcp://127.0.0.1:{spec.ports['kv_events']}"


def test_remote_backend_env_and_tensor_parallel() -> None:
    plan = render(
        "disagg",
        'lmcache.remote.url="redis-sentinel://:s3cret@h1:26379,h2:26379"',
        'lmcache.remote.service_name="mymaster"',
        "workers.prefill.gpus=[1,2]",
        "workers.prefill.tensor_parallel_size=2",
    )
    prefill = plan.process("prefill")
    assert prefill.env["LMCACHE_REMOTE_URL"] == "redis-sentinel://:s3cret@h1:26379,h2:26379"
    assert prefill.env["REDIS_SERVICE_NAME"] == "mymaster"
    assert prefill.env["CUDA_VISIBLE_DEVICES"] == "1,2" and prefill.tensor_parallel_size == 2
    assert flag(prefill.argv, "--tensor-parallel-size") == "2"


def test_render_is_deterministic_byte_for_byte() -> None:
    out = [
        subprocess.run(
            [sys.executable, "-m", "supervisor", "plan", "disagg", "--json"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
        for _ in range(2)
    ]
    assert out[0] == out[1]
    view = json.loads(out[0])
    assert [p["name"] for p in view["processes"]] == ["frontend", "decode", "prefill"]
    for key in ("name", "role", "argv", "env", "gpus", "ports", "depends_on", "probes", "restart"):
        assert key in view["processes"][0]


def test_secrets_are_redacted_in_plan_output() -> None:
    args = [
        "plan",
        "agg",
        "--set",
        'lmcache.remote.url="redis://user:hunter2@cache:6379"',
        "--set",
        'workers.worker.env.HF_TOKEN="hf_abcdef"',
    ]
    for extra in ([], ["--json"]):
        result = subprocess.run(
            [sys.executable, "-m", "supervisor", *args, *extra],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        )
        assert result.returncode == 0, result.stderr
        assert "hunter2" not in result.stdout and "hf_abcdef" not in result.stdout
        if extra:
            assert "redis://user:***@cache:6379" in result.stdout


def test_system_port_above_16_bit_is_refused() -> None:
    with pytest.raises(PlanError, match="above 32767"):
        render("demo", "ports.base=32700")


def test_port_collision_names_both_owners() -> None:
    with pytest.raises(PlanError, match="port 18081 .* already used by"):
        render("demo", "frontend.port=18081")


def test_relative_model_path_is_relative_to_the_file_that_wrote_it(tmp_path: Path) -> None:
    child = tmp_path / "elsewhere" / "mine.toml"
    child.parent.mkdir()
    child.write_text(f'extends = "{ROOT / "profiles" / "demo.toml"}"\n[ports]\nbase = 19000\n')
    plan = planmod.render(profiles.load(str(child)), state_root=STATE, python="/opt/py/bin/python")
    assert Path(plan.deployment.model) == ROOT / "profiles" / "demo-model"  # the parent's ./demo-model

    (tmp_path / "local-model").mkdir()
    child.write_text(f'extends = "{ROOT / "profiles" / "demo.toml"}"\n[model]\nname = "../local-model"\n')
    plan = planmod.render(profiles.load(str(child)), state_root=STATE, python="/opt/py/bin/python")
    assert Path(plan.deployment.model) == tmp_path / "local-model"
