"""Two things every harness here needs: a free block of loopback ports, and no process left behind.

Shared by the test suite (``tests/conftest.py``), the benchmarks, the soak and the GPU validation.
A harness sets an environment variable to a value of its own before it starts anything; every
child, grandchild and supervisor inherits it, so :func:`reap_marked` can find what outlived the run.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psutil

if TYPE_CHECKING:
    from supervisor.plan.spec import DeploymentSpec

#: The ``lmcache-supervise`` command of the interpreter running the harness (its venv's entry point).
CLI = str(Path(sys.executable).parent / "lmcache-supervise")

SYSTEM_PORT_MAX = 32767  # Dynamo reads DYN_SYSTEM_PORT as a signed 16-bit number


T = TypeVar("T")


def free_port(below: int = 65536) -> int:
    """One port free on loopback now; ``below`` leaves room above it (Redis Cluster's bus is port + 10000)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port < below:
            return port


def wait_for(predicate: Callable[[], T], timeout: float, *, interval: float = 0.01, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


def base_is_free(base: int, offsets: Iterable[int]) -> bool:
    """Whether ``base + offset`` is free on loopback for every offset."""
    socks: list[socket.socket] = []
    try:
        for offset in offsets:
            sock = socket.socket()
            socks.append(sock)
            # As the servers themselves bind: a port held only by TIME-WAIT connections (left by
            # probes of an earlier test's server) is free for them, and must count as free here.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", base + offset))
        return True
    except OSError:
        return False
    finally:
        for sock in socks:
            sock.close()


def free_port_base(
    offsets: Iterable[int], *, low: int = 20000, tries: int = 500, prefer: int | None = None
) -> int:
    """A base port such that ``base + offset`` is free on loopback for every offset: ``prefer``
    while it is, else one drawn at random.

    Bases are drawn at random (in steps of 10, from ``low``) so parallel harnesses rarely collide,
    and kept low enough that the highest offset stays a valid Dynamo system port.
    """
    offsets = tuple(offsets)
    if prefer is not None and base_is_free(prefer, offsets):
        return prefer
    choices = max(1, (SYSTEM_PORT_MAX - max(offsets, default=0) - low) // 10)
    for _ in range(tries):
        base = low + (uuid.uuid4().int % choices) * 10
        if base_is_free(base, offsets):
            return base
    raise RuntimeError("no free port range on loopback")


def marked(variable: str, value: str) -> list[psutil.Process]:
    """Live processes (not zombies, not us) whose environment carries ``variable=value``."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(variable) == value:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def reap_marked(variable: str, value: str, timeout_s: float = 5.0) -> list[str]:
    """Wait up to ``timeout_s`` for marked processes to go, SIGKILL the rest; describe those."""
    deadline = time.monotonic() + timeout_s
    while (left := marked(variable, value)) and time.monotonic() < deadline:
        time.sleep(0.05)
    leaked = []
    for proc in left:
        try:
            leaked.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
        except psutil.Error:
            pass
    return leaked


def fixture_deployment(name: str, state_dir: str | os.PathLike[str], **overrides: Any) -> DeploymentSpec:
    """The deployment of a plan of fixture children (tests, the bench's engine figures, the GPU scripts):
    no ready URL, no smoke request, no metrics port, state under ``state_dir``; ``overrides`` win."""
    from supervisor.plan.spec import DeploymentSpec

    state = Path(state_dir)
    fields: dict[str, Any] = dict(
        name=name,
        profile=name,
        engine="fixture",
        model="m",
        served_model_name="m",
        state_dir=str(state),
        base_url="http://127.0.0.1:1",
        ready_url="",
        smoke=None,
        ready_timeout_s=30.0,
        discovery="file",
        discovery_dir=None,
        etcd_endpoints=(),
        python=sys.executable,
        metrics_host="127.0.0.1",
        metrics_port=None,
        control_socket=str(state / "control.sock"),
        targets_file=str(state / "targets.json"),
    )
    return DeploymentSpec(**{**fields, **overrides})
