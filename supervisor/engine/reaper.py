"""Orphans left to the supervisor: reaped, so that zombies never pile up under it.

Run as a container's PID 1, the supervisor is the parent the kernel hands every orphan to: a
worker's grandchild whose parent exited (a double fork, an engine helper) becomes our child when
it is orphaned and, once it exits, stays a zombie until we wait for it. Outside a container the
supervisor makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``) for the same reason: the
orphans of its own tree come to it instead of to the host's init, so they stay in its process
tree (visible to the stop path's walk) and are reaped here.

Only zombies we did not spawn are reaped, and only once they were seen in two sweeps in a row: a
supervised child is reaped by its own exit watcher within milliseconds (its pidfd), and a zombie
reaped here before its owner waited would hand that owner a wrong exit status.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

import anyio

from supervisor.eventlog import log

PR_SET_CHILD_SUBREAPER = 36
#: How often our children are looked at: orphans are rare, a zombie costs only a pid slot.
SWEEP_S = 1.0


def become_subreaper() -> bool:
    """Make this process the reaper of its descendants' orphans; False where the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def zombie_children() -> set[int]:
    """Our children that exited and were not waited for (from /proc's per-thread child lists)."""
    zombies: set[int] = set()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return zombies
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as fh:
                kids = [int(field) for field in fh.read().split()]
        except OSError:
            continue
        for pid in kids:
            try:
                with open(f"/proc/{pid}/stat", "rb") as fh:
                    stat = fh.read()
            except OSError:
                continue
            if stat[stat.rfind(b")") + 2 :][:1] == b"Z":
                zombies.add(pid)
    return zombies


def reap(pids: set[int]) -> int:
    """Wait for each of ``pids`` (already zombies: this never blocks); returns how many were ours."""
    reaped = 0
    for pid in pids:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                reaped += 1
        except ChildProcessError:
            pass  # its owner was first
    return reaped


async def reap_orphans(spawned: Callable[[], set[int]], *, sweep_s: float = SWEEP_S) -> None:
    """Forever: reap the zombies among our children that ``spawned()`` does not claim and that
    were already zombies at the previous sweep."""
    seen: set[int] = set()
    total = 0
    while True:
        await anyio.sleep(sweep_s)
        now = zombie_children() - spawned()
        count = reap(now & seen)
        seen = now - (now & seen)
        if count:
            total += count
            log.info("reaped orphaned processes", count=count, total=total)
