"""Replica groups in the runner: gates on min_ready, readiness while a replica is down, and crash
loops that stay contained (fixture children, real processes)."""

from __future__ import annotations

import dataclasses
import os
import signal

import anyio
import pytest
from conftest import free_port_base
from test_runner import Recorder, health, supervising, until

from supervisor.engine.runner import Runner
from supervisor.engine.states import DeploymentState, ProcessState
from supervisor.plan.spec import Condition, Dependency, Plan, RestartPolicy

pytestmark = pytest.mark.anyio
P, D = ProcessState, DeploymentState
FAST = RestartPolicy(backoff_initial_s=0.0, jitter=0.0)
# A crash loop in well under a second: 3 starts, then FAILED, then one more try after 0.6 s.
LOOP = RestartPolicy(
    backoff_initial_s=0.02, jitter=0.0, limit_starts=3, limit_window_s=30.0, failed_retry_s=0.6
)


def replicas(make_spec, group: str, *argsets: tuple[str, ...], min_ready: int = 1, **kw):
    return [
        make_spec(f"{group}-{i}", *args, group=group, min_ready=min_ready, **kw)
        for i, args in enumerate(argsets)
    ]


def with_policy(plan: Plan, on_role_failed: str) -> Plan:
    return dataclasses.replace(
        plan, deployment=dataclasses.replace(plan.deployment, on_role_failed=on_role_failed)
    )


async def test_a_dependent_waits_for_min_ready_replicas_not_all(make_spec, make_plan) -> None:
    base = free_port_base(2)
    fast, slow = (
        ("--port", str(base), "--health-after", "0.2"),
        ("--port", str(base + 1), "--health-after", "2.5"),
    )
    w0, w1 = replicas(make_spec, "w", fast, slow)
    w0, w1 = dataclasses.replace(w0, probes=health(base)), dataclasses.replace(w1, probes=health(base + 1))
    dep = make_spec("d", depends_on=(Dependency("w", Condition.HEALTHY, min_ready=1),))
    rec = Recorder()
    runner = Runner(make_plan(w0, w1, dep))
    runner.subscribe(rec)
    async with supervising(runner):
        status = await until(runner, lambda s: s.state is D.READY)
        assert status.process("w-1").state is not P.RUNNING  # ready with 1 of 2: min_ready
        await until(runner, lambda s: s.process("w-1").state is P.RUNNING)
    d_started = rec.process("d", P.STARTING)[0][0]
    assert rec.process("w-0", P.RUNNING)[0][0] <= d_started < rec.process("w-1", P.RUNNING)[0][0]


async def test_one_replica_down_keeps_the_deployment_ready(make_spec, make_plan) -> None:
    base = free_port_base(2)
    slow_restart = RestartPolicy(backoff_initial_s=0.5, jitter=0.0)
    specs = replicas(make_spec, "w", ("--port", str(base)), ("--port", str(base + 1)), restart=slow_restart)
    specs = [dataclasses.replace(s, probes=health(base + i)) for i, s in enumerate(specs)]
    rec = Recorder()
    runner = Runner(make_plan(*specs))
    async with supervising(runner):
        status = await until(
            runner, lambda s: s.state is D.READY and all(p.state is P.RUNNING for p in s.processes)
        )
        runner.subscribe(rec)
        old = status.process("w-0").pid
        os.kill(old, signal.SIGKILL)
        await until(runner, lambda s: s.process("w-0").state is P.BACKOFF)
        assert runner.status().state is D.READY  # w-1 serves: min_ready 1 of 2
        status = await until(
            runner, lambda s: s.process("w-0").state is P.RUNNING and s.process("w-0").pid != old
        )
    changes = [e.new for _, e in rec.events if not hasattr(e, "name")]
    assert changes == [D.STOPPING, D.STOPPED], changes  # never DEGRADED, never re-gated before the shutdown
    assert status.process("w-0").restarts == 1 and status.process("w-0").group == "w"


async def test_a_crash_looping_replica_fails_alone_and_is_retried_later(make_spec, make_plan) -> None:
    base = free_port_base(1)
    good = make_spec("w-0", "--port", str(base), group="w", probes=health(base), restart=LOOP)
    bad = make_spec("w-1", "--exit-after", "0", "--exit-code", "3", group="w", restart=LOOP)
    rec, codes = Recorder(), []
    runner = Runner(make_plan(good, bad))
    runner.subscribe(rec)
    async with supervising(runner, codes):
        status = await until(runner, lambda s: s.process("w-1").state is P.FAILED, 10)
        assert status.state is D.DEGRADED and status.process("w-0").state is P.RUNNING
        assert (
            "crash loop" in status.process("w-1").reason
            and "retrying in 0.6 s" in status.process("w-1").reason
        )
        # the long backoff ends in one more start, and the loop fails it again (retry delay doubled)
        status = await until(runner, lambda s: "retrying in 1.2 s" in s.process("w-1").reason, 10)
        assert status.state is D.DEGRADED and status.process("w-0").state is P.RUNNING
        assert not runner.shutting_down
    assert len(rec.process("w-1", P.STARTING)) == 6  # 3 starts, FAILED, 3 more, FAILED
    assert codes == [0]  # a contained crash loop is no reason to exit


async def test_start_of_a_failed_replica_does_not_wait_out_its_retry_delay(make_spec, make_plan) -> None:
    base = free_port_base(1)
    policy = dataclasses.replace(LOOP, failed_retry_s=600.0)
    good = make_spec("w-0", "--port", str(base), group="w", probes=health(base), restart=policy)
    bad = make_spec("w-1", "--exit-after", "0", "--exit-code", "3", group="w", restart=policy)
    rec = Recorder()
    runner = Runner(make_plan(good, bad))
    runner.subscribe(rec)
    async with supervising(runner):
        await until(runner, lambda s: s.process("w-1").state is P.FAILED, 10)
        await runner.start("w-1")
        await until(runner, lambda s: len(rec.process("w-1", P.STARTING)) > 3, 5)
        await until(runner, lambda s: s.process("w-1").state is P.FAILED, 10)
        await runner.stop("w-1")
        assert runner.status().process("w-1").state is P.STOPPED
        assert runner.status().state is D.READY  # stopped on request: nothing failed any more


@pytest.mark.parametrize(("policy", "expected"), [("exit", D.FAILED), ("retry", D.DEGRADED)])
async def test_a_required_role_with_every_replica_failed(make_spec, make_plan, policy: str, expected) -> None:
    specs = replicas(make_spec, "w", *[("--exit-after", "0", "--exit-code", "3")] * 2, restart=LOOP)
    codes: list[int] = []
    runner = Runner(with_policy(make_plan(*specs), policy))
    async with supervising(runner, codes):
        status = await until(runner, lambda s: all(p.state is P.FAILED for p in s.processes), 10)
        if expected is D.FAILED:
            status = await until(runner, lambda s: s.state in (D.FAILED, D.STOPPING, D.STOPPED), 10)
            assert status.state is not D.DEGRADED
        else:
            with anyio.move_on_after(0.3):
                await until(runner, lambda s: s.state is not D.STARTING, 1)
            assert not runner.shutting_down
    assert codes == ([1] if expected is D.FAILED else [0])
