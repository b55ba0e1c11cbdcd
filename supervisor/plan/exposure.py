"""Which listeners a plan puts beyond loopback that take any client, and the rule about them.

etcd and nats-server authenticate (the cluster credentials: plan/infra.py). The other listeners a
deployment binds cannot, in Dynamo 1.6.1 and LMCache 0.5.6 (read in the released wheels, seen
running; README, "Several machines"):

- the workers' TCP request plane (``DYN_TCP_RPC_HOST``) and the frontend's response-stream server
  (``DYN_TCP_RESPONSE_STREAM_HOST``): plain TCP unless the processes get Dynamo's TLS variables
  with a client CA (``DYN_TCP_TLS_CERT_PATH``, ``_KEY_PATH``, ``_CLIENT_CA_CERT_PATH``): then both
  require a client certificate (mutual TLS, "client certificates required" in their logs);
- the ZMQ event plane (``DYN_EVENT_PLANE_HOST``; the NATS event plane goes through the token);
- NIXL side channels (``VLLM_NIXL_SIDE_CHANNEL_HOST``);
- each worker's system server (``DYN_SYSTEM_HOST``): ``/health`` and ``/metrics``, and on a vLLM
  worker the engine routes (``/engine/control/sleep``, ``update_weights_from_disk``, ...);
- the KV-events ZMQ publisher (``--kv-events-config``) and LMCache's multiprocess server.

A plan that binds any of them beyond loopback is refused unless the profile acknowledges it
(``discovery.insecure_planes = true``, or ``discovery.insecure = true`` which opens everything);
the acknowledged list then goes into the plan, for ``plan`` and the ``transport`` check to show.
Not gated because the plan cannot move them: Dynamo binds its event-plane ZMQ publishers to all
interfaces whatever the environment says (README, "Known limits").
The frontend's HTTP API (``frontend.host``) and the supervisor's metrics (``supervisor.metrics_host``)
are the endpoints a deployment serves on purpose, each under its own key: they are not gated here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from supervisor.errors import PlanError
from supervisor.plan.addresses import is_loopback
from supervisor.plan.spec import ProcessSpec, Role

if TYPE_CHECKING:
    from supervisor.profile.schema import Profile

# Dynamo 1.6.1 enforces client certificates on both TCP planes when these three are set.
MTLS_VARS = ("DYN_TCP_TLS_CERT_PATH", "DYN_TCP_TLS_KEY_PATH", "DYN_TCP_TLS_CLIENT_CA_CERT_PATH")
ACK_KEY = "discovery.insecure_planes"


def mutual_tls(env: Mapping[str, str]) -> bool:
    """Whether Dynamo's TCP request plane and response stream require a client certificate."""
    return all(env.get(var) for var in MTLS_VARS)


def _listeners(spec: ProcessSpec) -> Iterable[tuple[str, str, str]]:
    """``(what, setting, host)`` for each listener ``spec`` binds that takes any client."""
    env = spec.env
    if spec.role.is_worker:
        if env.get("DYN_REQUEST_PLANE", "tcp") == "tcp" and not mutual_tls(env):
            yield "TCP request plane", "DYN_TCP_RPC_HOST", env.get("DYN_TCP_RPC_HOST", "")
        if env.get("DYN_EVENT_PLANE", "zmq") == "zmq":
            yield "ZMQ event plane", "DYN_EVENT_PLANE_HOST", env.get("DYN_EVENT_PLANE_HOST", "")
        if "VLLM_NIXL_SIDE_CHANNEL_HOST" in env:
            yield "NIXL side channel", "VLLM_NIXL_SIDE_CHANNEL_HOST", env["VLLM_NIXL_SIDE_CHANNEL_HOST"]
        if "DYN_SYSTEM_PORT" in env:
            yield (
                "system server (health, metrics, engine routes)",
                "ports.host",
                env.get("DYN_SYSTEM_HOST", ""),
            )
        if "kv_events" in spec.ports:
            yield "KV-events publisher", "ports.host", spec.bind_host
    elif spec.role is Role.FRONTEND and not mutual_tls(env):
        yield (
            "response-stream server",
            "DYN_TCP_RESPONSE_STREAM_HOST",
            env.get("DYN_TCP_RESPONSE_STREAM_HOST", ""),
        )
    elif spec.role is Role.LMCACHE_SERVER:
        yield "LMCache server", "ports.host", spec.bind_host


def open_listeners(processes: Iterable[ProcessSpec]) -> tuple[str, ...]:
    """One line per kind of listener beyond loopback that takes any client, naming its bind
    setting, address and processes: ``TCP request plane on 10.0.0.1 (DYN_TCP_RPC_HOST: decode, prefill)``."""
    found: dict[tuple[str, str, str], list[str]] = {}
    for spec in processes:
        for what, setting, host in _listeners(spec):
            # An unset host lets Dynamo pick a routable address: beyond loopback too.
            if not host or not is_loopback(host):
                found.setdefault((what, setting, host or "a routable address"), []).append(spec.name)
    return tuple(
        f"{what} on {host} ({setting}: {', '.join(names)})" for (what, setting, host), names in found.items()
    )


def gate(profile: Profile, processes: Iterable[ProcessSpec], *, one_machine: bool) -> tuple[str, ...]:
    """The open listeners the profile accepts; refuse (exit 2) those it does not acknowledge.

    Bad input rather than a failed preflight check: the profile and the role options alone decide
    it, so ``plan``, ``check``, ``up`` and ``reload`` refuse it alike, before anything is probed."""
    listeners = open_listeners(processes)
    disc = profile.discovery
    if not listeners or disc.insecure or disc.insecure_planes:
        return listeners
    tcp_planes = any(line.startswith(("TCP request plane", "response-stream")) for line in listeners)
    raise PlanError(
        profile.source,
        ACK_KEY,
        f"{'; '.join(listeners)} would accept any client beyond loopback: allow only your nodes with "
        f'a firewall (README, "Several machines") and set {ACK_KEY} = true'
        + (", or set ports.host to a loopback address" if one_machine else "")
        + (", or give the TCP planes mutual TLS (DYN_TCP_TLS_* in env)" if tcp_planes else ""),
    )
