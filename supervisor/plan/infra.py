"""Several machines, purely: node roles, addresses, discovery env, and the head's etcd/NATS processes.

Dynamo's own answer to "more than one server" is etcd for discovery (and optionally NATS for the
request/event planes). A profile with ``discovery.backend = "etcd"`` and no ``etcd_endpoints`` has
the head node run etcd itself; a NATS plane with no ``nats_server`` has it run nats-server too.
Worker nodes run only their workers and point at the head.

Addresses: local-only things (health endpoints, the supervisor's metrics) bind ``ports.host``
(loopback by default). What other machines must reach binds the node's *advertise* address:
Dynamo's TCP request plane, its response-stream server (the frontend's: workers connect back to
it), the event plane, NIXL side channels, and the head's etcd/NATS. On one machine (``all``) there
is no advertise address and everything stays on ``ports.host``.

Fixed port offsets from ``ports.base`` (after etcd's 2379/2380 and NATS's 4222/8222):
etcd client +379, etcd peer +380, NATS client +422, NATS monitoring +822.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from supervisor.errors import PlanError
from supervisor.plan.addresses import http_url, is_loopback, is_wildcard, reachable, url_host
from supervisor.plan.policies import INFRA_STARTUP_BUDGET_S, probes, restart_policy
from supervisor.plan.spec import (
    Condition,
    Dependency,
    HttpCheck,
    Probes,
    ProcessSpec,
    ProtocolCheck,
    Role,
)

if TYPE_CHECKING:
    from supervisor.profile.schema import Profile

NodeRole = Literal["all", "head", "worker"]
NODE_ROLES: tuple[NodeRole, ...] = ("all", "head", "worker")
ETCD_CLIENT_OFFSET = 379
ETCD_PEER_OFFSET = 380
NATS_OFFSET = 422
NATS_MONITOR_OFFSET = 822

Claim = Callable[[int, str, str], int]


@dataclass(frozen=True)
class Node:
    """This machine's place in the deployment.

    ``local`` is where local-only sockets bind (``ports.host``); ``advertise`` is the address other
    nodes reach this one at (None on a single machine); ``head`` is the head node's address on a
    worker node.
    """

    role: NodeRole
    local: str
    advertise: str | None = None
    head: str | None = None

    @property
    def plane_host(self) -> str:
        """Where the planes other machines use bind, and what they are told to connect to."""
        return self.advertise or self.local

    @property
    def runs_frontend(self) -> bool:
        return self.role != "worker"

    def runs_worker(self, node: str) -> bool:
        """Whether a worker placed on ``node`` ("head" or "worker") runs here."""
        return self.role == "all" or self.role == node


def node(profile: Profile, role: str, *, head: str | None, advertise: str | None) -> Node:
    """Validate the role options against the profile; one error naming the option at fault."""
    src = profile.source
    if role not in NODE_ROLES:
        raise PlanError("--role", "", f"expected one of {', '.join(NODE_ROLES)}, got {role!r}")
    if role == "all":
        if head is not None:
            raise PlanError("--head", "", "is only used with --role worker")
        return Node(role="all", local=profile.ports.host, advertise=advertise)
    if profile.discovery.backend != "etcd":
        raise PlanError(
            src,
            "discovery.backend",
            f'--role {role} needs "etcd" (file discovery cannot cross machines), got '
            f'"{profile.discovery.backend}"; add --set discovery.backend=etcd',
        )
    if role == "worker" and not head:
        raise PlanError("--head", "", "is required with --role worker: the head node's address")
    if role == "head" and head is not None:
        raise PlanError("--head", "", "is only used with --role worker")
    if not advertise:
        raise PlanError(
            "--advertise",
            "",
            f"is required with --role {role}: the address other nodes reach this "
            "host at (or set ports.host to it)",
        )
    if is_wildcard(advertise):
        raise PlanError(
            "--advertise",
            "",
            f"expected the concrete address other nodes reach this host at, got {advertise!r}",
        )
    for flag, value in (("--head", head), ("--advertise", advertise)):
        if value and (value.startswith("-") or "/" in value or any(c.isspace() for c in value)):
            raise PlanError(flag, "", f"expected a host name or IP address, got {value!r}")
    placed = {w.node for w in profile.workers.values()}
    if role == "worker" and "worker" not in placed:
        raise PlanError(
            src, "workers", 'no worker is placed on worker nodes (every workers.<name>.node is "head")'
        )
    return Node(role=role, local=profile.ports.host, advertise=advertise, head=head)


def etcd_ports(profile: Profile) -> tuple[int, int]:
    base, etcd = profile.ports.base, profile.infra.etcd
    return etcd.client_port or base + ETCD_CLIENT_OFFSET, etcd.peer_port or base + ETCD_PEER_OFFSET


def nats_ports(profile: Profile) -> tuple[int, int]:
    base, nats = profile.ports.base, profile.infra.nats
    return nats.port or base + NATS_OFFSET, nats.monitor_port or base + NATS_MONITOR_OFFSET


def uses_nats(profile: Profile) -> bool:
    return "nats" in (profile.discovery.request_plane, profile.discovery.event_plane)


def runs_etcd(profile: Profile, here: Node) -> bool:
    return profile.discovery.backend == "etcd" and not profile.discovery.etcd_endpoints and here.runs_frontend


def runs_nats(profile: Profile, here: Node) -> bool:
    return uses_nats(profile) and profile.discovery.nats_server is None and here.runs_frontend


def _nats_bind(here: Node) -> str:
    # nats-server listens on one address: the advertise address when other machines need it.
    return here.local if is_wildcard(here.local) else here.plane_host


def etcd_endpoints(profile: Profile, here: Node) -> tuple[str, ...]:
    """The endpoints this node's processes use (empty without etcd discovery)."""
    if profile.discovery.backend != "etcd":
        return ()
    if profile.discovery.etcd_endpoints:
        return tuple(profile.discovery.etcd_endpoints)
    client, _ = etcd_ports(profile)
    host = here.head if here.role == "worker" and here.head else reachable(here.local)
    return (f"http://{url_host(host)}:{client}",)


def nats_server(profile: Profile, here: Node) -> str | None:
    if profile.discovery.nats_server is not None:
        return profile.discovery.nats_server
    if not uses_nats(profile):
        return None
    port, _ = nats_ports(profile)
    host = here.head if here.role == "worker" and here.head else reachable(_nats_bind(here))
    return f"nats://{url_host(host)}:{port}"


CREDENTIALS_FILE = "cluster-credentials"  # host/credentials.py writes and reads it
NATS_AUTH_CONFIG = "nats-auth.conf"


def authenticated(profile: Profile, here: Node) -> bool:
    """Whether the cluster servers the head runs require the cluster credentials: when they listen
    beyond loopback (any head/worker deployment, or one machine bound to a network address) and the
    profile does not say ``discovery.insecure = true``. Servers named in the profile
    (``etcd_endpoints``, ``nats_server``) are the operator's to secure: their ``env`` can carry the
    ``ETCD_AUTH_*``/``NATS_AUTH_*`` variables."""
    disc = profile.discovery
    ours = (disc.backend == "etcd" and not disc.etcd_endpoints) or (
        uses_nats(profile) and disc.nats_server is None
    )
    if disc.insecure or not ours:
        return False
    hosts = (
        [here.head or ""]
        if here.role == "worker"
        else [here.local, *([here.advertise] if here.advertise else [])]
    )
    return any(not is_loopback(h) for h in hosts)


def credentials_file(profile: Profile, here: Node, state: Path) -> str:
    """The cluster credentials file of this deployment, or "" when its transport is not authenticated."""
    return str(state / CREDENTIALS_FILE) if authenticated(profile, here) else ""


def discovery_env(profile: Profile, here: Node, discovery_dir: str | None) -> dict[str, str]:
    """Environment every Dynamo process of this node gets for discovery and the planes."""
    disc = profile.discovery
    if disc.backend == "file":
        env = {"DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": discovery_dir or ""}
    else:
        env = {
            "DYN_DISCOVERY_BACKEND": "etcd",
            "ETCD_ENDPOINTS": ",".join(etcd_endpoints(profile, here)),
            "ETCD_LEASE_TTL": str(disc.lease_ttl_s),
        }
    if disc.request_plane != "tcp":
        env["DYN_REQUEST_PLANE"] = disc.request_plane
    if disc.event_plane != "zmq":
        env["DYN_EVENT_PLANE"] = disc.event_plane
    server = nats_server(profile, here)
    if server is not None:
        env["NATS_SERVER"] = server
    return env


def _binary(name: str, binaries: Mapping[str, str]) -> str:
    """A path stays; a bare name becomes what the caller found for it (else stays bare: PATH at spawn)."""
    return name if "/" in name else binaries.get(name, name)


def _etcd_probes(profile: Profile, here: Node, state: Path, client: int) -> Probes:
    """/health and /version; with the cluster credentials the startup probe is the ``etcd-auth``
    check instead: etcd counts as started once its auth is on (the check turns it on) and the
    credentials log in, so no Dynamo process meets it open. Only at startup: a login costs etcd a
    bcrypt hash, not worth paying every readiness period."""
    url = http_url(here.local, client)
    health = HttpCheck(url=f"{url}/health", json_field="health", json_value="true", owned_port=client)
    etcd = profile.infra.etcd
    plain = probes(
        etcd.health, health, HttpCheck(url=f"{url}/version", owned_port=client), INFRA_STARTUP_BUDGET_S
    )
    secret = credentials_file(profile, here, state)
    if not secret or plain.startup is None:
        return plain
    auth = ProtocolCheck(
        "etcd-auth", reachable(here.local), client, owned_port=client, credentials_file=secret
    )
    # Several requests, two of them bcrypt: the probe's normal timeout, not the fast startup one.
    startup = replace(
        plain.startup, check=auth, timeout_s=max(plain.startup.timeout_s, etcd.health.timeout_s)
    )
    return replace(plain, startup=startup)


def infra_processes(
    profile: Profile, here: Node, *, state: Path, claim: Claim, binaries: Mapping[str, str]
) -> list[ProcessSpec]:
    """etcd and nats-server for the head (or a single machine), in start order; none on worker nodes."""
    # Late import: plan.py imports this module, and owns the probe and restart builders.

    out: list[ProcessSpec] = []
    if runs_etcd(profile, here):
        etcd = profile.infra.etcd
        client = claim(etcd_ports(profile)[0], "etcd.client", "infra.etcd.client_port")
        peer = claim(etcd_ports(profile)[1], "etcd.peer", "infra.etcd.peer_port")
        binds = [here.local] + (
            [here.advertise]
            if here.advertise and not is_wildcard(here.local) and here.advertise != here.local
            else []
        )
        listen = ",".join(f"http://{url_host(h)}:{client}" for h in binds)
        # One member, peering with nobody: its peer URL never needs to leave loopback.
        peer_url = f"http://127.0.0.1:{peer}"
        name = f"lmcs-{profile.name}"
        out.append(
            ProcessSpec(
                name="etcd",
                role=Role.ETCD,
                argv=(
                    _binary(etcd.binary, binaries),
                    "--name",
                    name,
                    "--data-dir",
                    str(state / "etcd"),
                    "--listen-client-urls",
                    listen,
                    "--advertise-client-urls",
                    http_url(here.plane_host, client),
                    "--listen-peer-urls",
                    peer_url,
                    "--initial-advertise-peer-urls",
                    peer_url,
                    "--initial-cluster",
                    f"{name}={peer_url}",
                    *etcd.args,
                ),
                env={},
                gpus=(),
                ports={"client": client, "peer": peer},
                probes=_etcd_probes(profile, here, state, client),
                restart=restart_policy(etcd.restart),
                stop_timeout_s=etcd.stop_timeout_s,
                bind_host=binds[-1],
                multiproc_dir="",
                log_file=str(state / "logs" / "etcd.log"),
            )
        )
    if runs_nats(profile, here):
        nats = profile.infra.nats
        port = claim(nats_ports(profile)[0], "nats.client", "infra.nats.port")
        monitor = claim(nats_ports(profile)[1], "nats.monitor", "infra.nats.monitor_port")
        bind = _nats_bind(here)
        url = http_url(bind, monitor)
        out.append(
            ProcessSpec(
                name="nats",
                role=Role.NATS,
                # JetStream on, as Dynamo's own launch scripts run it; its store lives in the state dir.
                argv=(
                    _binary(nats.binary, binaries),
                    "--addr",
                    bind,
                    "--port",
                    str(port),
                    "--http_port",
                    str(monitor),
                    "--jetstream",
                    "--store_dir",
                    str(state / "nats"),
                    # The token from a 0600 file the supervisor writes (on the command line `ps` shows it).
                    *(("--config", str(state / NATS_AUTH_CONFIG)) if authenticated(profile, here) else ()),
                    *nats.args,
                ),
                env={},
                gpus=(),
                ports={"client": port, "monitor": monitor},
                probes=probes(
                    nats.health,
                    HttpCheck(url=f"{url}/healthz", json_field="status", json_value="ok", owned_port=monitor),
                    HttpCheck(url=f"{url}/varz", owned_port=monitor),
                    INFRA_STARTUP_BUDGET_S,
                ),
                restart=restart_policy(nats.restart),
                stop_timeout_s=nats.stop_timeout_s,
                bind_host=bind,
                multiproc_dir="",
                log_file=str(state / "logs" / "nats.log"),
            )
        )
    return out


def infra_dependencies(infra: list[ProcessSpec]) -> tuple[Dependency, ...]:
    """The frontend starts only once every infrastructure server answers its health check."""
    return tuple(Dependency(spec.name, Condition.HEALTHY) for spec in infra)
