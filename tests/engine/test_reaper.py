"""The orphan reaper waits only for zombies nobody else owns (the PID-1 test is tests/e2e/test_pid1.py)."""

from __future__ import annotations

import os
import subprocess

import anyio
import pytest
from conftest import wait_for

from supervisor.engine import reaper


def test_unclaimed_zombies_are_reaped_claimed_ones_are_left_to_their_owner() -> None:
    orphan = subprocess.Popen(["true"])
    owned = subprocess.Popen(["true"])
    wait_for(lambda: {orphan.pid, owned.pid} <= reaper.zombie_children(), 5, what="two zombies")

    async def sweep() -> None:
        with anyio.move_on_after(0.5):  # several sweeps
            await reaper.reap_orphans(lambda: {owned.pid}, sweep_s=0.05)

    anyio.run(sweep)
    with pytest.raises(ChildProcessError):
        os.waitpid(orphan.pid, os.WNOHANG)  # gone: the reaper waited for it
    assert owned.pid in reaper.zombie_children()
    assert owned.wait(timeout=5) == 0  # its owner still gets its real exit status
    orphan.returncode = 0  # (already reaped; keep Popen's finalizer quiet)
