"""`up` as a container's PID 1: orphans re-parented to it are reaped, none is left a zombie.

`unshare --pid --fork --mount-proc` runs `up demo` as PID 1 of a new PID namespace. The workers'
interpreter is a wrapper that first leaves three orphans behind (each a `sleep` whose parent
shell exits at once), as a double-forking helper does; the kernel hands them to PID 1, and when
they exit they are zombies until PID 1 waits for them. Needs root and util-linux's unshare; the
test is skipped elsewhere with that reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
import time
from pathlib import Path

import psutil
import pytest
from harness import Deployment

pytestmark = pytest.mark.e2e
ORPHANS_PER_WORKER = 3


def _wrapper(tmp_path: Path) -> Path:
    path = tmp_path / "python-with-orphans"
    path.write_text(
        "#!/bin/sh\n"
        "# Leave orphans: each subshell backgrounds a short sleep and exits at once.\n"
        f"for i in $(seq {ORPHANS_PER_WORKER}); do ( sleep 0.5 & ) ; done\n"
        f'exec {sys.executable} "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _zombie_children(pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(pid).children() if c.status() == psutil.STATUS_ZOMBIE]


def test_up_as_pid_1_reaps_the_orphans_its_workers_leave(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("PID 1 test: needs root and util-linux's unshare for a new PID namespace")
    wrapper = _wrapper(tmp_path)
    ns = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM"]
    with Deployment(tmp_path / "pid1", wrapper=ns, extra=("--set", f'python="{wrapper}"')) as up:
        up.wait_ready()
        pid1 = psutil.Process(up.pid).children()[0]  # unshare's child: `up`, PID 1 inside
        assert "up" in pid1.cmdline() and "demo" in pid1.cmdline()
        nspid = next(
            line
            for line in Path(f"/proc/{pid1.pid}/status").read_text().splitlines()
            if line.startswith("NSpid:")
        )
        assert nspid.split()[-1] == "1"
        # Each worker left its orphans; they exited 0.5 s later. Two sweeps of the reaper later
        # (1 s apart) none may be left as a zombie, and the deployment still serves.
        up.wait(lambda: up.named("reaped orphaned processes"), 20, "the reaper's event")
        time.sleep(2.5)
        assert _zombie_children(pid1.pid) == []
        reaped = sum(e.data["count"] for e in up.named("reaped orphaned processes"))
        assert reaped >= 2 * ORPHANS_PER_WORKER  # decode and prefill (the frontend is not wrapped)
        assert up.cli("status").returncode == 0
        os.kill(pid1.pid, signal.SIGTERM)  # unshare does not pass SIGTERM on: signal PID 1 itself
        assert up.proc.wait(timeout=60) == 0
