"""Faults the engine must absorb, with fixture children: a child dying inside its startup probe,
a frozen (SIGSTOPped) child, a metrics directory that cannot be made, an unwritable log directory.

The deployment-sized versions (the real demo, a full tmpfs) are in tests/e2e/test_resource_faults.py
and the fault soak; docs/reliability.md maps each fault to its test.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio
import pytest
from conftest import alive, free_port_base
from test_runner import FAST, Recorder, health, supervising, until

from supervisor import eventlog
from supervisor.engine.process import spawn
from supervisor.engine.runner import Runner
from supervisor.engine.states import DeploymentState, ProcessState
from supervisor.plan.spec import HttpCheck, Probe, Probes, RestartPolicy

pytestmark = pytest.mark.anyio
P, D = ProcessState, DeploymentState


async def test_child_exiting_during_its_startup_probe_is_a_crash(make_spec, make_plan) -> None:
    """It never turns healthy; each exit is seen at once (not when the 10 s load budget runs out),
    goes through backoff like any crash, and the crash-loop limit ends it."""
    base = free_port_base(1)
    policy = RestartPolicy(backoff_initial_s=0.05, jitter=0.0, limit_starts=3, limit_window_s=60.0)
    spec = make_spec(
        "loader",
        "--port",
        str(base),
        "--health-after",
        "30",
        "--exit-after",
        "0.3",
        "--exit-code",
        "7",
        probes=health(base, startup_budget_s=10.0),
        restart=policy,
    )
    rec, codes = Recorder(), []
    runner = Runner(make_plan(spec))
    runner.subscribe(rec)
    started = time.monotonic()
    async with supervising(runner, codes):
        status = await until(runner, lambda s: s.process("loader").state is P.FAILED, 20)
    assert time.monotonic() - started < 5  # three 0.3 s lives, not three 10 s budgets
    assert not rec.process("loader", P.RUNNING)
    backoffs = rec.process("loader", P.BACKOFF)
    assert len(backoffs) == 2 and all("exit code 7" in e.reason for _, e in backoffs)
    assert not rec.process("loader", P.STOPPING)  # it was not killed for its probe: it exited
    assert "crash loop" in status.process("loader").reason
    assert status.process("loader").last_exit.returncode == 7
    assert codes == [1]


async def test_frozen_child_is_stopped_without_sitting_out_its_timeout(make_spec) -> None:
    """SIGTERM to a SIGSTOPped group is followed by SIGCONT (as systemd does), so it exits on SIGTERM."""
    spec = make_spec("frozen", stop_timeout_s=20.0)
    lines: list[bytes] = []
    async with anyio.create_task_group() as tg:
        child = spawn(spec, guardian=None)
        tg.start_soon(child.watch, lines.append)
        with anyio.fail_after(10):
            while b"started" not in b"".join(lines):
                await anyio.sleep(0.01)
        os.killpg(child.pgid, signal.SIGSTOP)
        began = time.monotonic()
        info = await child.stop()
    assert info.signal == signal.SIGTERM
    assert time.monotonic() - began < 2.0


async def test_frozen_child_is_restarted_by_liveness(make_spec, make_plan) -> None:
    base = free_port_base(1)
    check = HttpCheck(url=f"http://127.0.0.1:{base}/health", owned_port=base)
    probes = Probes(
        startup=Probe(check=check, period_s=0.05, timeout_s=0.5, failure_threshold=200),
        liveness=Probe(check=check, period_s=0.2, timeout_s=0.2, failure_threshold=3),
    )
    spec = make_spec("frozen", "--port", str(base), probes=probes, restart=FAST, stop_timeout_s=20.0)
    rec = Recorder()
    runner = Runner(make_plan(spec))
    runner.subscribe(rec)
    async with supervising(runner):
        first = (await until(runner, lambda s: s.state is D.READY)).process("frozen").pid
        os.killpg(first, signal.SIGSTOP)
        frozen = time.monotonic()
        status = await until(runner, lambda s: s.state is D.READY and s.process("frozen").pid != first, 15)
    took = time.monotonic() - frozen
    stopping = rec.process("frozen", P.STOPPING)
    assert stopping and "liveness" in stopping[0][1].reason
    assert status.process("frozen").restarts == 1
    assert status.process("frozen").last_exit.signal == signal.SIGTERM  # it got to act on SIGTERM
    assert took < 5.0, took  # liveness (~1.2 s) + restart, not the 20 s stop timeout
    assert not alive(first)


async def test_metrics_dir_that_cannot_be_made_fails_the_process_in_one_line(
    make_spec, make_plan, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    spec = make_spec("nometrics", multiproc_dir=str(blocker / "nometrics"))
    rec, codes = Recorder(), []
    runner = Runner(make_plan(spec))
    runner.subscribe(rec)
    async with supervising(runner, codes):
        status = await until(runner, lambda s: s.state in (D.FAILED, D.STOPPED), 10)
    failed = rec.process("nometrics", P.FAILED)
    expected = f"PROMETHEUS_MULTIPROC_DIR {blocker / 'nometrics'}: Not a directory"
    assert failed and failed[0][1].reason == expected
    assert status.process("nometrics").pid is None
    assert codes == [1]


async def test_unwritable_log_keeps_supervising_and_says_so_once(
    make_spec, make_plan, tmp_path: Path
) -> None:
    blocker = tmp_path / "logs-blocked"
    blocker.write_text("")
    base = free_port_base(1)
    spec = make_spec(
        "talker", "--port", str(base), probes=health(base), restart=FAST, log_file=str(blocker / "talker.log")
    )
    with eventlog.log.capture() as captured:
        runner = Runner(make_plan(spec))
        async with supervising(runner):
            old = (await until(runner, lambda s: s.state is D.READY)).process("talker").pid
            os.kill(old, signal.SIGKILL)
            status = await until(runner, lambda s: s.state is D.READY and s.process("talker").pid != old, 10)
    errors = [e for e in captured if e["event"].startswith("child log not writable")]
    assert len(errors) == 1, errors  # once, not once per chunk or per restart
    assert errors[0]["process"] == "talker" and errors[0]["path"] == str(blocker / "talker.log")
    assert errors[0]["error"]  # the OS's words (which depend on how the path is broken)
    assert status.process("talker").restarts == 1
