"""Who listens on a TCP port: the one reading of the kernel's socket table, for every caller.

Preflight names the holder of a port it cannot bind, the probes name a stranger answering on a
child's health port, and ``status`` attributes "Address already in use" hints; all of them ask
here. One scan of the table serves every port asked about in one pass (:func:`listeners`), or,
for the probes, every port asked about within a second (:func:`snapshot`).
"""

from __future__ import annotations

import threading
import time
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


_table_lock = threading.Lock()
_table: tuple[float, list[Listener]] = (-1.0, [])


def snapshot(max_age_s: float) -> list[Listener]:
    """:func:`listeners`, from a scan at most ``max_age_s`` old: every port asked about in that
    time shares one read of the table (thread-safe; a caller arriving during a scan waits for it)."""
    global _table
    with _table_lock:
        taken, table = _table
        if time.monotonic() - taken > max_age_s:
            table = listeners()
            _table = (time.monotonic(), table)
        return table


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
