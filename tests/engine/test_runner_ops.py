"""Control operations at awkward moments: during a slow stop, during a backoff, during shutdown.

Operations on one process run one at a time in the order they were made; none of them may crash
the supervisor. (The random interleavings are in test_runner_stateful.py.)
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio
import pytest
from conftest import alive
from test_runner import Recorder, supervising, until

from supervisor.engine import lifecycle as lifecycle_module
from supervisor.engine.runner import Runner
from supervisor.engine.states import PROCESS_TRANSITIONS, DeploymentState, ProcessState
from supervisor.errors import StartError
from supervisor.plan.spec import RestartPolicy

pytestmark = pytest.mark.anyio
P, D = ProcessState, DeploymentState
SLOW_BACKOFF = RestartPolicy(backoff_initial_s=30.0, jitter=0.0, limit_starts=0)


async def _ignoring_term(runner: Runner, name: str) -> int:
    """Wait until ``name`` runs and its child printed "started" (it ignores SIGTERM from then on)."""
    status = await until(runner, lambda s: s.process(name).state is P.RUNNING)
    pid = status.process(name).pid
    assert pid is not None
    log = Path(runner.plan.process(name).log_file)
    with anyio.fail_after(5):
        while not (log.exists() and f"started {pid}".encode() in log.read_bytes()):
            await anyio.sleep(0.01)
    return pid


def _legal(rec: Recorder) -> list[str]:
    return [
        f"{e.name}: {e.old.value} -> {e.new.value}"
        for _, e in rec.process("slow") + rec.process("a")
        if e.new is not e.old and e.new not in PROCESS_TRANSITIONS[e.old]
    ]


async def test_restart_made_during_a_slow_stop_waits_for_it_then_starts(make_spec, make_plan) -> None:
    """The reported crash: `stop decode &` then `restart decode` while decode drains."""
    spec = make_spec("slow", "--ignore-term", stop_timeout_s=0.5)
    rec = Recorder()
    runner = Runner(make_plan(spec))
    runner.subscribe(rec)
    codes: list[int] = []
    async with supervising(runner, codes):
        old = await _ignoring_term(runner, "slow")
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.stop, "slow")
            await anyio.sleep(0.05)  # the stop is now waiting out the SIGTERM grace
            assert runner.status().process("slow").state is P.STOPPING
            tg.start_soon(runner.restart, "slow")
        status = await until(runner, lambda s: s.process("slow").state is P.RUNNING, 5)
        new = status.process("slow").pid
        states = [e.new for _, e in rec.process("slow")]
    assert codes == [0]
    assert new != old and not alive(old)
    assert states[-6:] == [P.RUNNING, P.STOPPING, P.STOPPED, P.WAITING, P.STARTING, P.RUNNING]
    assert not _legal(rec)


async def test_start_made_during_a_slow_stop_starts_after_it(make_spec, make_plan) -> None:
    runner = Runner(make_plan(make_spec("slow", "--ignore-term", stop_timeout_s=0.5)))
    async with supervising(runner):
        old = await _ignoring_term(runner, "slow")
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.stop, "slow")
            await anyio.sleep(0.05)
            tg.start_soon(runner.start, "slow")
        status = await until(runner, lambda s: s.process("slow").state is P.RUNNING, 5)
    assert status.process("slow").pid != old
    assert not alive(old)


async def test_stop_made_during_a_restart_wins(make_spec, make_plan) -> None:
    runner = Runner(make_plan(make_spec("slow", "--ignore-term", stop_timeout_s=0.3)))
    async with supervising(runner):
        await _ignoring_term(runner, "slow")
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.restart, "slow")
            tg.start_soon(runner.stop, "slow")
        status = await until(runner, lambda s: s.process("slow").state is P.STOPPED, 5)
        await anyio.sleep(0.5)  # nothing starts it again behind the stop's back
        assert runner.status().process("slow").state is P.STOPPED
    assert status.process("slow").pid is None


@pytest.mark.parametrize("op", ["restart", "start"])
async def test_restart_or_start_during_a_backoff_starts_now(make_spec, make_plan, op: str) -> None:
    """Before, a restart during the backoff was dropped silently: the 30 s delay ran out first."""
    runner = Runner(make_plan(make_spec("a", restart=SLOW_BACKOFF)))
    async with supervising(runner):
        old = (await until(runner, lambda s: s.process("a").state is P.RUNNING)).process("a").pid
        os.kill(old, signal.SIGKILL)
        await until(runner, lambda s: s.process("a").state is P.BACKOFF, 5)
        asked = time.monotonic()
        await getattr(runner, op)("a")
        status = await until(runner, lambda s: s.process("a").state is P.RUNNING, 5)
    assert time.monotonic() - asked < 2.0
    assert status.process("a").pid != old


async def test_operations_after_shutdown_began_do_nothing_and_raise_nothing(make_spec, make_plan) -> None:
    runner = Runner(make_plan(make_spec("slow", "--ignore-term", stop_timeout_s=0.3)))
    codes: list[int] = []
    async with supervising(runner, codes):
        await _ignoring_term(runner, "slow")
        runner.request_shutdown()
        await runner.restart("slow")
        await runner.start("slow")
        await runner.stop("slow")
        status = await until(runner, lambda s: s.state is D.STOPPED, 5)
    assert codes == [0]
    assert status.process("slow").state is P.STOPPED


async def test_unknown_process_is_a_start_error_not_a_crash(make_spec, make_plan) -> None:
    runner = Runner(make_plan(make_spec("a")))
    async with supervising(runner):
        await until(runner, lambda s: s.process("a").state is P.RUNNING)
        with pytest.raises(StartError, match="no such process"):
            await runner.restart("nope")
        assert runner.status().process("a").state is P.RUNNING


async def test_a_bug_in_one_lifecycle_fails_that_process_not_the_supervisor(
    make_spec, make_plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net: an unexpected exception inside a lifecycle marks that process failed."""
    runner = Runner(make_plan(make_spec("a"), make_spec("b", required=False)))
    real_spawn = lifecycle_module.spawn

    def spawn(spec, **kwargs):  # type: ignore[no-untyped-def]
        if spec.name == "b":
            raise RuntimeError("a bug")
        return real_spawn(spec, **kwargs)

    monkeypatch.setattr(lifecycle_module, "spawn", spawn)  # the lifecycle is what spawns
    async with supervising(runner):
        status = await until(
            runner, lambda s: s.process("b").state is P.FAILED and s.process("a").state is P.RUNNING
        )
        assert "internal error: a bug" in status.process("b").reason
        assert status.process("a").state is P.RUNNING
        await runner.restart("a")  # still supervising
        await until(runner, lambda s: s.process("a").state is P.RUNNING and s.process("a").restarts == 1)


async def test_planned_restarts_do_not_count_toward_a_crash_loop(make_spec, make_plan) -> None:
    """Found by scripts/frontends_lb.py: three `restart frontend` and two SIGKILLs within 120 s made
    five starts, and the frontend was failed as a crash loop. Only unplanned exits count."""
    policy = RestartPolicy(backoff_initial_s=0.05, jitter=0.0, limit_starts=3, limit_window_s=60.0)
    rec = Recorder()
    runner = Runner(make_plan(make_spec("a", restart=policy)))
    runner.subscribe(rec)
    async with supervising(runner):

        async def again(act: str) -> None:
            status = await until(runner, lambda s: s.process("a").state is P.RUNNING)
            old = status.process("a").pid
            assert old is not None
            if act == "restart":
                await runner.restart("a")
            else:
                os.kill(old, signal.SIGKILL)
            await until(runner, lambda s: s.process("a").state is P.RUNNING and s.process("a").pid != old)

        for act in ["restart"] * 4 + ["kill"] * 2:  # more starts than the limit, two of them crashes
            await again(act)
    assert len(rec.process("a", P.STARTING)) == 7 and not rec.process("a", P.FAILED)
