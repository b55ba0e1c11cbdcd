"""Orderly shutdown: dependents stop first, and processes with no dependency between them stop together."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import anyio
import pytest

from supervisor.engine.runner import Runner
from supervisor.engine.states import DeploymentEvent, DeploymentState, ProcessEvent, ProcessState, RunnerEvent
from supervisor.plan.spec import Condition, Dependency

pytestmark = pytest.mark.anyio
P, D = ProcessState, DeploymentState
STOP_S = 0.4

# Exits STOP_S after SIGTERM; touches its file once the handler is in place.
SLOW_STOP = (
    "import os, signal, sys, time\n"
    f"signal.signal(signal.SIGTERM, lambda *a: (time.sleep({STOP_S}), os._exit(0)))\n"
    "open(sys.argv[1], 'w').close()\n"
    "while True: time.sleep(1)\n"
)


async def stop_all(runner: Runner, ready_files: list[Path]) -> list[tuple[float, RunnerEvent]]:
    events: list[tuple[float, RunnerEvent]] = []
    runner.subscribe(lambda e: events.append((time.monotonic(), e)))
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.serve)
        with anyio.fail_after(10):  # every child has its SIGTERM handler installed
            while not all(f.exists() for f in ready_files):
                await anyio.sleep(0.01)
        runner.request_shutdown()
        await runner.wait_until(lambda s: s.state is D.STOPPED, timeout_s=10)
    return events


def at(events: list[tuple[float, RunnerEvent]], name: str, new: ProcessState) -> float:
    return next(t for t, e in events if isinstance(e, ProcessEvent) and e.name == name and e.new is new)


def deployment_at(events: list[tuple[float, RunnerEvent]], new: DeploymentState) -> float:
    return next(t for t, e in events if isinstance(e, DeploymentEvent) and e.new is new)


async def test_independent_processes_stop_together(make_spec, make_plan, tmp_path: Path) -> None:
    files = [tmp_path / f"ready{i}" for i in range(4)]
    specs = [make_spec(f"p{i}", argv=(sys.executable, "-c", SLOW_STOP, str(f))) for i, f in enumerate(files)]
    events = await stop_all(Runner(make_plan(*specs)), files)
    took = deployment_at(events, D.STOPPED) - deployment_at(events, D.STOPPING)
    # One after another would be 4 * 0.4 s; together it is one stop time plus the bookkeeping.
    assert STOP_S <= took < 2 * STOP_S, took


async def test_a_dependency_stops_only_after_its_dependents(make_spec, make_plan, tmp_path: Path) -> None:
    files = [tmp_path / name for name in ("a", "b", "c")]
    a = make_spec("a", argv=(sys.executable, "-c", SLOW_STOP, str(files[0])))
    b = make_spec(
        "b",
        argv=(sys.executable, "-c", SLOW_STOP, str(files[1])),
        depends_on=(Dependency("a", Condition.STARTED),),
    )
    c = make_spec("c", argv=(sys.executable, "-c", SLOW_STOP, str(files[2])))  # unrelated to a and b
    events = await stop_all(Runner(make_plan(a, b, c)), files)
    assert at(events, "a", P.STOPPING) >= at(events, "b", P.STOPPED)  # the chain is kept
    assert at(events, "c", P.STOPPING) < at(events, "b", P.STOPPED)  # c did not wait for it
    took = deployment_at(events, D.STOPPED) - deployment_at(events, D.STOPPING)
    assert 2 * STOP_S <= took < 3 * STOP_S, took
