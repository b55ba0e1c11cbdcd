"""A head whose etcd / nats-server listen beyond loopback requires the cluster credentials; one whose
profile says ``discovery.insecure = true`` is told, at every check and up, that they take any client
and to firewall them."""

from __future__ import annotations

from pathlib import Path

from supervisor.host.facts import HostFacts
from supervisor.plan import render as planmod
from supervisor.preflight.checks import check_transport
from supervisor.preflight.findings import Status
from supervisor.profile import load as profiles

BINARIES = {"etcd": "/opt/etcd/bin/etcd", "nats-server": "/opt/nats/bin/nats-server"}


def _plan(*overrides: str, role: str = "all", advertise: str | None = None, head: str | None = None):
    loaded = profiles.load("demo", overrides=("discovery.insecure_planes=true", *overrides))
    return planmod.render(
        loaded,
        state_root=Path("/srv/state"),
        python="/opt/py/bin/python",
        node_role=role,
        head=head,
        advertise=advertise,
        binaries=BINARIES,
    )


def test_a_head_on_the_network_requires_the_cluster_credentials() -> None:
    plan = _plan(
        'discovery.backend="etcd"', 'discovery.event_plane="nats"', role="head", advertise="10.9.0.1"
    )
    found, *_ = check_transport(plan, HostFacts.__new__(HostFacts))
    assert found.status is Status.OK
    assert "etcd on 10.9.0.1:" in found.message and "nats on " in found.message
    assert "/srv/state/demo/cluster-credentials" in found.message


def test_an_insecure_head_on_the_network_is_warned_about_its_open_etcd_and_nats() -> None:
    plan = _plan(
        'discovery.backend="etcd"',
        'discovery.event_plane="nats"',
        "discovery.insecure=true",
        role="head",
        advertise="10.9.0.1",
    )
    found, *_ = check_transport(plan, HostFacts.__new__(HostFacts))
    assert found.status is Status.WARN
    assert "etcd on 10.9.0.1:" in found.message and "nats on " in found.message
    assert "without authentication" in found.message and "firewall" in found.hint


def test_one_machine_is_not_warned() -> None:
    found, *_ = check_transport(_plan(), HostFacts.__new__(HostFacts))
    assert found.status is Status.OK


def test_a_worker_node_without_the_heads_credentials_fails_the_check(tmp_path: Path) -> None:
    from supervisor.host import credentials

    loaded = profiles.load("demo", overrides=('discovery.backend="etcd"', "discovery.insecure_planes=true"))
    plan = planmod.render(
        loaded, state_root=tmp_path, node_role="worker", head="10.9.0.1", advertise="10.9.0.2"
    )
    secret = plan.deployment.credentials_file
    assert secret == str(tmp_path / "demo" / "cluster-credentials")
    missing = HostFacts.__new__(HostFacts)
    object.__setattr__(missing, "credentials_problem", credentials.problem(secret))
    found, *_ = check_transport(plan, missing)
    assert found.status is Status.FAIL and "cluster-credentials is missing" in found.message
    assert f"to {secret}, mode 0600" in found.hint
    (tmp_path / "demo").mkdir(mode=0o700)
    credentials.generate(secret)
    present = HostFacts.__new__(HostFacts)
    object.__setattr__(present, "credentials_problem", credentials.problem(secret))
    found, *_ = check_transport(plan, present)
    assert found.status is Status.OK and secret in found.message


def test_acknowledged_open_planes_are_warned_about_with_the_firewall_rule() -> None:
    plan = _plan('discovery.backend="etcd"', role="worker", head="10.9.0.1", advertise="10.9.0.2")
    found = [f for f in check_transport(plan, HostFacts.__new__(HostFacts)) if f.status is Status.WARN]
    [open_planes] = found
    assert "TCP request plane on 10.9.0.2 (DYN_TCP_RPC_HOST: decode, prefill)" in open_planes.message
    assert "ZMQ event plane on 10.9.0.2" in open_planes.message
    assert "accept any client without authentication (discovery.insecure_planes)" in open_planes.message
    assert "firewall" in open_planes.hint and "ip saddr != <your nodes> drop" in open_planes.hint
