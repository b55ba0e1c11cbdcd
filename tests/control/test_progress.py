"""Startup progress: stage lines with elapsed time, time to ready, and the periodic "loading" line."""

from __future__ import annotations

import json
import re
import sys

import anyio
import pytest

from supervisor import eventlog
from supervisor.control.progress import Progress, Timeline
from supervisor.engine.states import (
    DeploymentEvent,
    DeploymentState,
    DeploymentStatus,
    ProcessEvent,
    ProcessState,
    ProcessStatus,
)

P, D = ProcessState, DeploymentState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def status(state: ProcessState, uptime_s: float | None) -> DeploymentStatus:
    proc = ProcessStatus(
        name="decode",
        role="decode",
        state=state,
        required=True,
        pid=7,
        started_wall=None,
        uptime_s=uptime_s,
        restarts=0,
        last_exit=None,
        last_probe=None,
        reason="",
    )
    return DeploymentStatus(
        name="d", state=D.STARTING, base_url="", model="m", ready_since_wall=None, processes=(proc,)
    )


def test_stage_lines_carry_elapsed_time_and_load_duration() -> None:
    clock = Clock()
    timeline = Timeline(now=clock)
    lines: list[str] = []
    progress = Progress(timeline, sink=lines.append)
    for observer in (timeline, progress):
        observer(ProcessEvent("decode", P.WAITING, P.STARTING, 7, "spawned pid 7", 100.5))
    clock.now = 145.5
    for observer in (timeline, progress):
        observer(ProcessEvent("decode", P.STARTING, P.RUNNING, 7, "ready", 145.5))
    clock.now = 146.0
    ready = DeploymentEvent(D.STARTING, D.READY, "model ready", 146.0, status(P.RUNNING, 45.5))
    for observer in (timeline, progress):
        observer(ready)
    assert lines == [
        "[    0.0 s] decode starting: pid 7",
        "[   45.5 s] decode healthy: after 45.0 s",
        "[   46.0 s] deployment ready: in 46.0 s",
    ]
    assert timeline.time_to_ready_s == 46.0


def test_without_a_terminal_stages_are_structured_log_events(capsys: pytest.CaptureFixture[str]) -> None:
    saved = (eventlog.log.sink, eventlog.log.level)
    eventlog.configure(json=True, stream=sys.stdout)  # capsys's stdout, read back below
    try:
        clock = Clock()
        progress = Progress(Timeline(now=clock))
        progress(ProcessEvent("decode", P.WAITING, P.STARTING, 7, "spawned pid 7", 100.0))
        progress(ProcessEvent("decode", P.STARTING, P.STOPPING, 7, "stop", 101.0))  # not a stage
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    finally:
        eventlog.log.sink, eventlog.log.level = saved
    assert len(events) == 1 and events[0].pop("level") == "info"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", events[0].pop("timestamp"))
    assert events == [
        {
            "elapsed_s": 0.0,
            "detail": "pid 7",
            "stage": "process",
            "process": "decode",
            "state": "starting",
            "pid": 7,
            "event": "startup stage",
        }
    ]


def test_a_process_loading_for_long_is_named_periodically() -> None:
    progress = Progress(Timeline(), every_s=10.0)
    assert progress.loading_lines(status(P.STARTING, 45.2)) == [("decode", 45.2)]
    assert progress.loading_lines(status(P.STARTING, 3.0)) == []  # just started: not worth a line yet
    assert progress.loading_lines(status(P.RUNNING, 45.2)) == []


@pytest.mark.anyio
async def test_the_loading_service_prints_while_something_starts() -> None:
    lines: list[str] = []
    progress = Progress(Timeline(), sink=lines.append, every_s=0.05)

    class Source:
        def status(self) -> DeploymentStatus:
            return status(P.STARTING, 45.0)

    with anyio.move_on_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(progress.serve, Source())
            while len(lines) < 2:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert lines[0].endswith("decode: loading (45 s)")
