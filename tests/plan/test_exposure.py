"""Listeners that cannot authenticate bind beyond loopback only when the profile says
``discovery.insecure_planes = true`` (or ``discovery.insecure = true``); otherwise plan, check and up
refuse with one line (exit 2) naming them and the key. Accepted, they are named in the plan."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from supervisor.cli.app import main
from supervisor.errors import EXIT_BAD_INPUT, PlanError
from supervisor.plan import render as planmod
from supervisor.plan.spec import Plan
from supervisor.profile import load as profiles

HEAD, WORKER = "10.9.0.1", "10.9.0.2"
ETCD = ('discovery.backend="etcd"',)
MTLS = (
    'env.DYN_TCP_TLS_CERT_PATH="/etc/lmcs/node.pem"',
    'env.DYN_TCP_TLS_KEY_PATH="/etc/lmcs/node.key"',
    'env.DYN_TCP_TLS_CLIENT_CA_CERT_PATH="/etc/lmcs/ca.pem"',
)
NATS_PLANES = ('discovery.request_plane="nats"', 'discovery.event_plane="nats"')


def render(*overrides: str, name: str = "demo", role: str = "all", head: str | None = None) -> Plan:
    advertise = {"head": HEAD, "worker": WORKER}.get(role)
    return planmod.render(
        profiles.load(name, overrides=overrides),
        state_root=Path("/srv/state"),
        python="/opt/py/bin/python",
        node_role=role,
        head=head,
        advertise=advertise,
    )


def refusal(*overrides: str, **kw: str) -> str:
    with pytest.raises(PlanError) as err:
        render(*overrides, **kw)
    assert err.value.exit_code == EXIT_BAD_INPUT and err.value.key == "discovery.insecure_planes"
    message = str(err.value)
    assert "\n" not in message and "set discovery.insecure_planes = true" in message
    return message


def test_the_head_refuses_its_open_response_stream() -> None:
    why = refusal(*ETCD, role="head")
    assert f"response-stream server on {HEAD} (DYN_TCP_RESPONSE_STREAM_HOST: frontend)" in why
    assert 'firewall (README, "Several machines")' in why and "mutual TLS" in why


def test_a_worker_node_refuses_its_open_request_and_event_planes() -> None:
    why = refusal(*ETCD, role="worker", head=HEAD)
    assert f"TCP request plane on {WORKER} (DYN_TCP_RPC_HOST: decode, prefill)" in why
    assert f"ZMQ event plane on {WORKER} (DYN_EVENT_PLANE_HOST: decode, prefill)" in why


def test_a_vllm_worker_node_names_its_nixl_side_channels() -> None:
    why = refusal(*ETCD, name="disagg", role="worker", head=HEAD)
    assert f"NIXL side channel on {WORKER} (VLLM_NIXL_SIDE_CHANNEL_HOST: decode, prefill)" in why


def test_one_machine_on_all_interfaces_is_told_to_use_loopback() -> None:
    why = refusal('ports.host="0.0.0.0"')
    assert "system server (health, metrics, engine routes) on 0.0.0.0 (ports.host: decode, prefill)" in why
    assert "set ports.host to a loopback address" in why


def test_loopback_binds_nothing_open() -> None:
    assert render().deployment.open_listeners == ()
    assert render(*ETCD).deployment.open_listeners == ()


@pytest.mark.parametrize("ack", ["discovery.insecure_planes=true", "discovery.insecure=true"])
def test_acknowledged_listeners_are_named_in_the_plan(ack: str) -> None:
    head = render(*ETCD, ack, role="head").deployment.open_listeners
    assert head == (f"response-stream server on {HEAD} (DYN_TCP_RESPONSE_STREAM_HOST: frontend)",)
    worker = render(*ETCD, ack, role="worker", head=HEAD).deployment.open_listeners
    assert [line.split(" on ")[0] for line in worker] == ["TCP request plane", "ZMQ event plane"]
    served = render('ports.host="0.0.0.0"', "lmcache.server={}", ack, name="agg").deployment
    assert "LMCache server on 0.0.0.0 (ports.host: lmcache-server)" in served.open_listeners


def test_mutual_tls_and_nats_planes_need_no_acknowledgement() -> None:
    """Dynamo 1.6.1 requires a client certificate on both TCP planes once the server has a client CA
    (seen: "TLS enabled with mutual authentication"); NATS planes go through the cluster token."""
    assert render(*ETCD, *NATS_PLANES, *MTLS, role="head").deployment.open_listeners == ()
    assert render(*ETCD, *NATS_PLANES, *MTLS, role="worker", head=HEAD).deployment.open_listeners == ()
    # Mutual TLS without the NATS event plane still leaves ZMQ open; without a client CA, TLS alone
    # authenticates nobody.
    assert "ZMQ event plane" in refusal(*ETCD, *MTLS, role="worker", head=HEAD)
    assert "response-stream" in refusal(*ETCD, *NATS_PLANES, *MTLS[:2], role="head")


@pytest.mark.parametrize("command", ["check", "up"])
def test_check_and_up_refuse_before_anything_runs(tmp_path: Path, command: str) -> None:
    env = {"LMCACHE_SUPERVISE_STATE_ROOT": str(tmp_path)}
    args = [command, "demo", "--set", 'ports.host="0.0.0.0"']
    refused = CliRunner().invoke(main, args, env=env)
    assert refused.exit_code == EXIT_BAD_INPUT and "Traceback" not in refused.output, refused.output
    assert (
        "discovery.insecure_planes: " in refused.output and "set ports.host to a loopback" in refused.output
    )
    assert not (tmp_path / "demo" / "logs").exists()  # nothing was started


def test_plan_refuses_on_one_line_and_shows_the_acknowledged_listeners(tmp_path: Path) -> None:
    env = {"LMCACHE_SUPERVISE_STATE_ROOT": str(tmp_path)}
    args = ["plan", "demo", "--set", "discovery.backend=etcd", "--role", "head", "--advertise", HEAD]
    refused = CliRunner().invoke(main, args, env=env)
    assert refused.exit_code == EXIT_BAD_INPUT and "Traceback" not in refused.output
    assert "discovery.insecure_planes: response-stream server on" in refused.output
    shown = CliRunner().invoke(main, [*args, "--set", "discovery.insecure_planes=true"], env=env)
    assert shown.exit_code == 0, shown.output
    assert f"open to any client: response-stream server on {HEAD}" in shown.output
