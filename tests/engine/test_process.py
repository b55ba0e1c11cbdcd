"""One child at a time: isolation, group stop with escalation, output pumping, the guardian."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import anyio
import pytest
from conftest import alive, wait_for

from supervisor.engine.logs import ChildOutput, LogOptions, RotatingFile
from supervisor.engine.logwriter import Writer
from supervisor.engine.process import DRAIN_GRACE_S, Guardian, group_members, spawn
from supervisor.plan.spec import ProcessSpec

pytestmark = pytest.mark.anyio

_INSPECT = """
import json, os, sys
print(json.dumps({
    "pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
    "stdin": os.readlink("/proc/self/fd/0"),
    "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
    "notify": os.environ.get("NOTIFY_SOCKET"), "listen": os.environ.get("LISTEN_FDS"),
    "prom": os.environ.get("PROMETHEUS_MULTIPROC_DIR"), "extra": os.environ.get("EXTRA"),
    "prom_files": os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]),
}), flush=True)
"""


async def test_child_is_isolated(make_spec, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("LISTEN_FDS", "2")
    spec: ProcessSpec = make_spec("inspect", argv=(sys.executable, "-c", _INSPECT), env={"EXTRA": "1"})
    os.makedirs(spec.multiproc_dir)
    Path(spec.multiproc_dir, "counter_123.db").write_text("stale")
    leaked = os.open(str(tmp_path / "ours"), os.O_CREAT | os.O_WRONLY)  # an fd of ours
    os.set_inheritable(leaked, True)  # even an inheritable one must not reach the child
    chunks: list[bytes] = []
    try:
        async with anyio.create_task_group() as tg:
            child = spawn(spec, guardian=None)
            tg.start_soon(child.watch, chunks.append)
            info = await child.wait()
    finally:
        os.close(leaked)
    assert info.clean
    seen = json.loads(b"".join(chunks))
    assert seen["pid"] == seen["pgid"] == seen["sid"] == child.pid
    assert seen["stdin"] == "/dev/null"
    assert seen["fds"] == [0, 1, 2, 3]  # 3 is listdir's own descriptor
    assert seen["notify"] is None and seen["listen"] is None
    assert seen["prom"] == spec.multiproc_dir and seen["prom_files"] == []
    assert seen["extra"] == "1"


async def test_child_ignoring_sigterm_is_killed_after_its_timeout(make_spec) -> None:
    spec = make_spec("stubborn", "--ignore-term", stop_timeout_s=0.5)
    lines: list[bytes] = []
    async with anyio.create_task_group() as tg:
        child = spawn(spec, guardian=None)
        tg.start_soon(child.watch, lines.append)
        with anyio.fail_after(10):
            while b"started" not in b"".join(lines):
                await anyio.sleep(0.01)
        started = time.monotonic()
        info = await child.stop()
        took = time.monotonic() - started
    assert info.signal == signal.SIGKILL
    assert 0.5 <= took < 3.0
    assert not group_members(child.pgid)


async def test_grandchild_in_the_group_dies_with_it(make_spec, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    spec = make_spec("parent", "--grandchild", "group", "--pidfile", str(pids), "--exit-after", "0.2")
    async with anyio.create_task_group() as tg:
        child = spawn(spec, guardian=None)
        tg.start_soon(child.watch, lambda data: None)
        info = await child.wait()
        grandchild = int(pids.read_text().split()[1])
        assert alive(grandchild) and info.clean  # the leader exited; its grandchild lingers
        await child.stop()
    assert not alive(grandchild)
    assert not group_members(child.pgid)


async def test_grandchild_holding_the_pipe_does_not_block(make_spec, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    spec = make_spec("parent", "--grandchild", "escape", "--pidfile", str(pids), "--exit-after", "0.2")
    grandchild = None
    try:
        with anyio.fail_after(DRAIN_GRACE_S + 5):
            async with anyio.create_task_group() as tg:
                child = spawn(spec, guardian=None)
                tg.start_soon(child.watch, lambda data: None)
                await child.wait()
                grandchild = int(pids.read_text().split()[1])
                exited = time.monotonic()
                await child.stop()
            # watch() (the pump) returned although the escaped grandchild still holds the pipe.
        assert time.monotonic() - exited < DRAIN_GRACE_S + 1.0
        assert alive(grandchild)
    finally:
        if grandchild is not None:
            os.kill(grandchild, signal.SIGKILL)


async def test_hundred_megabytes_of_output_neither_blocks_nor_fills_the_disk(
    make_spec, tmp_path: Path
) -> None:
    spec = make_spec("flood", "--flood", str(100 * 1024 * 1024), "--exit-after", "0")
    options = LogOptions(max_bytes=8 * 1024 * 1024, backups=2)
    # Its own writer, with room for the whole flood: on a busy machine the shared one may rightly
    # drop some of it (tests/engine/test_log_stall.py), and this test checks rotation, not drops.
    output = ChildOutput("flood", spec.log_file, options, echo=None, writer=Writer(capacity=128 << 20))
    worst_gap = 0.0

    async def ticker() -> None:
        nonlocal worst_gap
        last = time.monotonic()
        while True:
            await anyio.sleep(0.005)
            now = time.monotonic()
            worst_gap, last = max(worst_gap, now - last), now

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            child = spawn(spec, guardian=None)
            await child.watch(output)
            tg.cancel_scope.cancel()
    output.close()
    assert output.flush(30) and output.dropped_bytes == 0  # written off the loop, nothing dropped
    logs = sorted(Path(spec.log_file).parent.glob("flood.log*"))
    total = sum(p.stat().st_size for p in logs)
    assert child.exit is not None and child.exit.clean
    assert [p.name for p in logs] == ["flood.log", "flood.log.1", "flood.log.2"]
    assert total <= 3 * options.max_bytes + 65536
    assert b"flood done" in Path(spec.log_file).read_bytes()
    assert worst_gap < 0.25, f"event loop stalled for {worst_gap:.3f} s"


def test_unwritable_log_dir_drops_output_and_keeps_going(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    sink = RotatingFile(str(blocker / "x.log"), max_bytes=1024, backups=1, owner="decode")
    sink.write(b"hello\n")  # must not raise
    sink.write(b"again\n")
    assert sink.dropped_bytes == 12


def _grandchild_pid(pidfile: Path) -> int:
    """The fixture child writes its own pid, then its grandchild's."""
    wait_for(
        lambda: pidfile.exists() and len(pidfile.read_text().split()) == 2, 10, what="grandchild started"
    )
    return int(pidfile.read_text().split()[1])


async def test_a_grandchild_that_left_the_group_is_stopped_with_it(make_spec, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    spec = make_spec("daemonizer", "--grandchild", "escape", "--pidfile", str(pids), "--ignore-term")
    async with anyio.create_task_group() as tg:
        child = spawn(spec, guardian=None)
        tg.start_soon(child.watch, lambda data: None)
        grandchild = _grandchild_pid(pids)
        assert os.getpgid(grandchild) != child.pgid  # setsid(): out of reach of the group signals
        info = await child.stop(timeout_s=0.5)
    assert info.signal == signal.SIGKILL  # --ignore-term: the escalation reached the stray too
    assert not alive(grandchild)


async def test_a_stray_seen_while_running_is_stopped_after_the_leader_died(make_spec, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    spec = make_spec("daemonizer", "--grandchild", "escape", "--pidfile", str(pids))
    async with anyio.create_task_group() as tg:
        child = spawn(spec, guardian=None)
        tg.start_soon(child.watch, lambda data: None)
        grandchild = _grandchild_pid(pids)
        child.snapshot_tree()  # what the runner does once the process has started
        os.kill(child.pid, signal.SIGKILL)  # the leader crashes; its stray is now init's
        await child.wait()
        assert alive(grandchild)
        await child.stop()  # the clean-up after an unexpected exit
    assert not alive(grandchild)


async def test_guardian_kills_registered_groups_when_the_supervisor_goes(make_spec) -> None:
    guardian = Guardian()
    spec = make_spec("orphan-to-be", "--grandchild", "group")
    async with anyio.create_task_group() as tg:
        child = spawn(spec, guardian=guardian)
        tg.start_soon(child.watch, lambda data: None)
        wait_for(lambda: len(group_members(child.pgid)) == 2, 10, what="child and grandchild up")
        os.close(guardian._fd)  # what the kernel does to the pipe when the supervisor dies
        await child.wait()
        wait_for(lambda: not group_members(child.pgid), 5, what="group killed by the guardian")
        assert child.exit is not None and child.exit.signal == signal.SIGKILL
        await child.stop()
    guardian._proc.wait(timeout=5)


async def test_guardian_also_kills_a_stray_group_it_was_told_of(make_spec, tmp_path: Path) -> None:
    guardian = Guardian()
    pids = tmp_path / "pids"
    spec = make_spec("daemonizer", "--grandchild", "escape", "--pidfile", str(pids))
    async with anyio.create_task_group() as tg:
        child = spawn(spec, guardian=guardian)
        tg.start_soon(child.watch, lambda data: None)
        grandchild = _grandchild_pid(pids)
        child.snapshot_tree()
        os.close(guardian._fd)  # the supervisor dies
        await child.wait()
        wait_for(lambda: not alive(grandchild), 5, what="stray killed by the guardian")
        await child.stop()
    guardian._proc.wait(timeout=5)


def test_a_guardian_that_stopped_reading_never_blocks_a_registration() -> None:
    """Its pipe full (the guardian SIGSTOPped), registering returns at once and says so, once."""
    guardian = Guardian()
    try:
        os.kill(guardian.pid, signal.SIGSTOP)
        started = time.monotonic()
        for pgid in range(100_000, 110_000):  # ~80 KiB of lines: more than a pipe holds
            guardian.register(pgid)
        assert time.monotonic() - started < 2.0
        assert guardian.lost > 0
    finally:
        os.kill(guardian.pid, signal.SIGCONT)
        guardian.close()
