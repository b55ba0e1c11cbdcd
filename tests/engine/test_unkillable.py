"""A process that survives SIGKILL: the stop is bounded, says so, and supervision goes on.

The process is made really unkillable: a cgroup-v1 freezer holds it in uninterruptible sleep
(state D), where a SIGKILL stays pending until it is thawed, as a GPU driver or NFS hang does.
That needs root and the v1 freezer hierarchy; elsewhere the test is skipped with that reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from conftest import alive, wait_for
from test_runner import supervising, until

from supervisor.control import hints
from supervisor.engine import process
from supervisor.engine.runner import Runner
from supervisor.engine.states import ProcessState

pytestmark = pytest.mark.anyio
P = ProcessState
FREEZER = Path("/sys/fs/cgroup/freezer")


@pytest.fixture
def freezer() -> Iterator[Path]:
    if os.geteuid() != 0 or not (FREEZER / "cgroup.procs").exists():
        pytest.skip(
            "needs root and the cgroup-v1 freezer (/sys/fs/cgroup/freezer) to make a process unkillable"
        )
    group = FREEZER / f"lmcache-supervise-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        yield group
    finally:
        (group / "freezer.state").write_text("THAWED")
        for pid in (group / "cgroup.procs").read_text().split():  # back to the root group, then gone
            (FREEZER / "cgroup.procs").write_text(pid)
        group.rmdir()


async def test_a_process_surviving_sigkill_is_reported_and_supervision_goes_on(
    make_spec, make_plan, freezer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "GROUP_KILL_WAIT_S", 0.5)
    unregistered: list[int] = []
    real_unregister = process.Guardian.unregister

    def unregister(self: process.Guardian, pgid: int) -> None:
        unregistered.append(pgid)
        real_unregister(self, pgid)

    monkeypatch.setattr(process.Guardian, "unregister", unregister)
    spec = make_spec("a", stop_timeout_s=0.3)
    runner = Runner(make_plan(spec))
    async with supervising(runner):
        old = (await until(runner, lambda s: s.process("a").state is P.RUNNING)).process("a").pid
        assert old is not None
        (freezer / "cgroup.procs").write_text(str(old))
        (freezer / "freezer.state").write_text("FROZEN")
        wait_for(lambda: (freezer / "freezer.state").read_text().strip() == "FROZEN", 5, what="frozen")
        with anyio.fail_after(5):  # bounded: stop timeout 0.3 s + SIGKILL wait 0.5 s
            await runner.stop("a")
        status = runner.status().process("a")
        assert status.state is P.STOPPED
        assert f"pid {old} D (uninterruptible sleep" in status.reason and "survived SIGKILL" in status.reason
        assert (
            status.last_exit is not None
            and status.last_exit.describe() == "survived SIGKILL (uninterruptible)"
        )
        assert alive(old) and old not in unregistered  # the guardian still has its group
        log_file = Path(spec.log_file)  # written by the log thread: wait for the line
        wait_for(lambda: log_file.exists() and "survived SIGKILL" in log_file.read_text(), 5, what="the line")
        found = hints.scan(log_file.read_text().splitlines())
        assert [h.kind for h in found] == ["unkillable"]
        await runner.start("a")  # supervision goes on
        new = (await until(runner, lambda s: s.process("a").state is P.RUNNING)).process("a").pid
        assert new not in (None, old)
        (freezer / "freezer.state").write_text("THAWED")
        wait_for(lambda: not alive(old), 5, what="the thawed process to act on its SIGKILL")
