"""Startup progress: how long each stage took, and which process is still loading its model.

:class:`Timeline` is a runner observer that remembers when supervision began and when the
deployment was first ready (``time_to_ready_s``, shown by ``status`` and exported as a metric).

:class:`Progress` is an observer plus a runner service that reports stages with the time since
supervision began: each process starting, healthy, backing off or failed, and the deployment's
changes. A real model load takes minutes, so while a process sits in its startup probe it also
says so every ``every_s`` seconds ("decode: loading (45 s)"). The words go to ``sink`` when one
is given (the CLI passes a terminal printer) and otherwise become structured log events
(``startup stage``, ``process loading``) for journald and files. It is cheap: one status
snapshot per period, and only while something is starting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import anyio

from supervisor.engine.states import (
    DeploymentEvent,
    DeploymentState,
    DeploymentStatus,
    ProcessEvent,
    ProcessState,
    RunnerEvent,
)
from supervisor.eventlog import log

P = ProcessState
LOADING_EVERY_S = 10.0

# Which transitions are a stage worth a line: the rest (waiting, stopping) are in the runner's log.
STAGE_WORDS = {
    P.STARTING: "starting",
    P.RUNNING: "healthy",
    P.NOT_READY: "unhealthy",
    P.BACKOFF: "backoff",
    P.FAILED: "failed",
    P.EXITED: "exited",
}


class StageClock:
    """The detail of a process's stage line: its pid when it starts, how long it took when it turns
    healthy ("after 0.4 s"), else the runner's reason. Feed it every process event (:meth:`note`)."""

    def __init__(self) -> None:
        self._entered: dict[str, float] = {}  # process -> when it last entered STARTING

    def note(self, event: ProcessEvent) -> None:
        if event.new is P.STARTING:
            self._entered[event.name] = event.at

    def took_s(self, event: ProcessEvent) -> float | None:
        """Seconds from STARTING to healthy, for a RUNNING event; None otherwise."""
        if event.new is P.RUNNING and event.name in self._entered:
            return event.at - self._entered[event.name]
        return None

    def detail(self, event: ProcessEvent) -> str:
        took = self.took_s(event)
        if took is not None:
            return f"after {took:.1f} s"
        return f"pid {event.pid}" if event.new is P.STARTING else event.reason


class _HasStatus(Protocol):
    def status(self) -> DeploymentStatus: ...


class Timeline:
    """When supervision began and when the deployment was first ready (monotonic seconds)."""

    def __init__(self, *, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self.started_at = now()
        self.started_wall = time.time()
        self.first_ready_at: float | None = None

    def __call__(self, event: RunnerEvent) -> None:
        if (
            isinstance(event, DeploymentEvent)
            and event.new is DeploymentState.READY
            and self.first_ready_at is None
        ):
            self.first_ready_at = event.at

    @property
    def time_to_ready_s(self) -> float | None:
        """Seconds from the start of supervision to the first READY; None until then."""
        return None if self.first_ready_at is None else max(0.0, self.first_ready_at - self.started_at)

    def elapsed_s(self) -> float:
        return self._now() - self.started_at


class Progress:
    """Stage lines with elapsed time, and a periodic line per process still loading."""

    def __init__(
        self,
        timeline: Timeline,
        *,
        sink: Callable[[str], None] | None = None,
        every_s: float = LOADING_EVERY_S,
    ) -> None:
        self.timeline, self.sink, self.every_s = timeline, sink, every_s
        self._clock = StageClock()

    def __call__(self, event: RunnerEvent) -> None:
        elapsed = self.timeline.elapsed_s()
        if isinstance(event, ProcessEvent):
            self._clock.note(event)
            stage = STAGE_WORDS.get(event.new)
            if stage is None or event.new is event.old:
                return
            took = self._clock.took_s(event)
            self._say(
                elapsed,
                f"{event.name} {stage}",
                self._clock.detail(event),
                stage="process",
                process=event.name,
                state=stage,
                pid=event.pid,
                took_s=None if took is None else round(took, 3),
            )
        elif isinstance(event, DeploymentEvent):
            ttr = self.timeline.time_to_ready_s if event.new is DeploymentState.READY else None
            detail = f"in {ttr:.1f} s" if ttr is not None else event.reason
            self._say(
                elapsed,
                f"deployment {event.new.value}",
                detail,
                stage="deployment",
                state=event.new.value,
                time_to_ready_s=None if ttr is None else round(ttr, 3),
            )

    def _say(self, elapsed: float, what: str, detail: str, **fields: object) -> None:
        if self.sink is not None:
            self.sink(f"[{elapsed:7.1f} s] {what}" + (f": {detail}" if detail else ""))
        else:
            log.info(
                "startup stage",
                elapsed_s=round(elapsed, 3),
                detail=detail,
                **{k: v for k, v in fields.items() if v is not None},
            )

    def loading_lines(self, status: DeploymentStatus) -> list[tuple[str, float]]:
        """``(process, seconds)`` for every process that has been starting for at least ``every_s``."""
        return [
            (p.name, p.uptime_s)
            for p in status.processes
            if p.state is P.STARTING and p.uptime_s is not None and p.uptime_s >= self.every_s
        ]

    async def serve(self, runner: _HasStatus) -> None:
        """The runner service: every ``every_s``, name each process still in its startup probe."""
        while True:
            await anyio.sleep(self.every_s)
            for name, loading_s in self.loading_lines(runner.status()):
                if self.sink is not None:
                    self.sink(f"[{self.timeline.elapsed_s():7.1f} s] {name}: loading ({loading_s:.0f} s)")
                else:
                    log.info(
                        "process loading",
                        process=name,
                        loading_s=round(loading_s, 1),
                        elapsed_s=round(self.timeline.elapsed_s(), 3),
                    )
