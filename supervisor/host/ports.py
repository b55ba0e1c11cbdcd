"""Who listens on a TCP port: the one reading of the kernel's socket table, for every caller.

Preflight names the holder of a port it cannot bind, the probes name a stranger answering on a
child's health port, and ``status`` attributes "Address already in use" hints; all of them ask
here. One scan of the table serves every port asked about in one pass (:func:`listeners`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psutil

from supervisor.plan.addresses import WILDCARDS


@dataclass(frozen=True)
class Listener:
    """A listening TCP socket; ``pid`` is None when its owner is not visible to us (another user's)."""

    port: int
    ip: str
    pid: int | None


def listeners() -> list[Listener]:
    """Every listening TCP socket on this host, from one scan of the socket table ([] if unreadable)."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return []
    return [
        Listener(c.laddr.port, c.laddr.ip, c.pid) for c in conns if c.status == psutil.CONN_LISTEN and c.laddr
    ]


def holder(port: int, *, host: str | None = None, table: Iterable[Listener] | None = None) -> Listener | None:
    """The listener on ``port``, preferring one bound to ``host`` or a wildcard, then one with a known pid."""
    found = [entry for entry in (listeners() if table is None else table) if entry.port == port]
    found.sort(key=lambda e: (e.ip not in (host, *WILDCARDS), e.pid is None))
    return found[0] if found else None


def describe(pid: int) -> str | None:
    """A short name for ``pid``: its command line's first words (whitespace folded), else its name."""
    try:
        proc = psutil.Process(pid)
        return " ".join(" ".join(proc.cmdline()[:4]).split())[:80] or proc.name()
    except (psutil.Error, OSError):
        return None


def process_name(pid: int) -> str | None:
    """``pid``'s process name (``python3``, ``redis-server``), or None once it is gone or hidden."""
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return None
