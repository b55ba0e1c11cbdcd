"""The terminal `up`'s lines above the panel: each stage once on one clock, one ready line, and only the
events that are news (the panel shows the rest). The screen itself is tested in e2e/test_terminal_up.py."""

from __future__ import annotations

import io

from rich.console import Console

from supervisor.cli.live import TerminalUp, stage_text
from supervisor.engine.states import (
    DeploymentEvent,
    DeploymentState,
    DeploymentStatus,
    ProcessEvent,
    ProcessState,
    ProcessStatus,
)

P, D = ProcessState, DeploymentState


def status(state: D, proc: P, uptime: float | None = 12.0) -> DeploymentStatus:
    p = ProcessStatus("decode", "decode", proc, True, 7, None, uptime, 0, None, None, "")
    return DeploymentStatus("demo", state, "http://127.0.0.1:18000", "demo", None, (p,))


def view() -> tuple[TerminalUp, io.StringIO]:
    out = io.StringIO()
    clock = iter([0.2, 0.6, 0.9, 1.0, 5.0, 6.0, 7.0, 8.0])
    up = TerminalUp(
        console=Console(file=out, width=120, color_system=None),
        ready_text=lambda s: f"ready: OpenAI API at http://127.0.0.1:18000/v1 (model demo) in {s:.1f} s",
        elapsed=lambda: next(clock),
        document=lambda s: {},
        render=lambda doc: "",
    )
    return up, out


def test_stages_once_on_one_clock_and_a_single_ready_line() -> None:
    up, out = view()
    up(ProcessEvent("decode", P.WAITING, P.STARTING, 7, "spawned pid 7", 100.0))
    up(ProcessEvent("decode", P.STARTING, P.RUNNING, 7, "ready", 100.4))
    ready = DeploymentEvent(D.STARTING, D.READY, "model ready", 100.5, status(D.READY, P.RUNNING))
    up(ready)
    up(DeploymentEvent(D.READY, D.DEGRADED, "decode backoff", 104.0, status(D.DEGRADED, P.BACKOFF)))
    up(DeploymentEvent(D.DEGRADED, D.READY, "model ready", 105.0, status(D.READY, P.RUNNING)))
    assert out.getvalue().splitlines() == [
        "[    0.2 s] decode starting: pid 7",
        "[    0.6 s] decode healthy: after 0.4 s",
        "ready: OpenAI API at http://127.0.0.1:18000/v1 (model demo) in 0.9 s",
        "[    1.0 s] deployment degraded: decode backoff",
        "[    5.0 s] deployment ready again",
    ]


def test_only_news_among_the_info_events() -> None:
    up, out = view()
    up.event({"event": "process starting", "process": "decode", "level": "info", "timestamp": "x"})
    up.event({"event": "reload", "restart": ["decode"], "level": "info", "timestamp": "x"})
    up.event(
        {"event": "GPU memory still held; starting anyway", "pids": [4], "level": "warning", "timestamp": "x"}
    )
    assert out.getvalue().splitlines() == [
        "[    0.2 s] reload  restart=['decode']",
        "[    0.6 s] warning: GPU memory still held; starting anyway  pids=[4]",
    ]


def test_the_stage_line_names_what_is_loading_and_for_how_long() -> None:
    assert stage_text(status(D.STARTING, P.STARTING, 45.2), 46.0) == "decode: loading 45 s"
    assert stage_text(status(D.READY, P.RUNNING), 60.4) == "ready 60 s"
    assert stage_text(status(D.STOPPING, P.STOPPING), 61.0) == "stopping: decode"
