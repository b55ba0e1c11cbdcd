"""What ``up`` shows on a terminal: one live panel, each supervisor event once, one ready line.

The panel is the ``status`` table (the same document and the same renderer, refreshed four times a
second from the runner's snapshot) under a line naming the current stage (``decode: loading 45 s``).
Above it, printed once each and never redrawn: the stages on one clock (the time since supervision
began), warnings and errors from the event log, exactly one ``ready:`` line, and during Ctrl-C the
processes stopping in order. Children's output stays in their log files (``logs -f``) unless
``--logs`` asks for it here: then it scrolls with a colored ``name |`` prefix, among the same event
lines, and there is no panel (``status`` in another terminal shows the table).

Without a terminal none of this exists: the events are JSON lines on stderr and stdout carries only
the ready line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from supervisor.control.progress import STAGE_WORDS, StageClock
from supervisor.engine.states import (
    DeploymentEvent,
    DeploymentState,
    DeploymentStatus,
    ProcessEvent,
    ProcessState,
    RunnerEvent,
)
from supervisor.eventlog import LEVELS, WARNING

P = ProcessState
REFRESH_S = 0.25
# Info events worth a line above the panel: they change what runs, and no state line says why.
NEWS = frozenset(
    {
        "reload",
        "control request",
        "removed stale discovery entries",
        "reaped orphaned processes",
        "shutdown requested",
    }
)
# Transitions worth a line of their own (the stages, and on a terminal the ordered stop too); the
# panel shows every other state as it happens.
_WORDS = {**STAGE_WORDS, P.STOPPING: "stopping", P.STOPPED: "stopped"}
_STYLE = {
    "healthy": "green",
    "starting": "cyan",
    "unhealthy": "yellow",
    "backoff": "yellow",
    "failed": "bold red",
    "exited": "yellow",
    "stopping": "magenta",
    "stopped": "dim",
}


def stage_text(status: DeploymentStatus, now_elapsed: float) -> str:
    """The one thing to look at now: who is loading and for how long, or the deployment's state."""
    loading = [
        f"{p.name}: loading {p.uptime_s:.0f} s"
        for p in status.processes
        if p.state is P.STARTING and p.uptime_s is not None
    ]
    waiting = [p.name for p in status.processes if p.state is P.WAITING]
    stopping = [p.name for p in status.processes if p.state is P.STOPPING]
    if stopping:
        return "stopping: " + ", ".join(stopping)
    if loading:
        return "; ".join(loading) + (f"  (then {', '.join(waiting)})" if waiting else "")
    return f"{status.state.value} {now_elapsed:.0f} s"


class TerminalUp:
    """The terminal ``up``: an observer and a service of the runner, and the event log's sink.

    ``document`` turns a status snapshot into the ``status --json`` document; ``render`` turns that
    into the table ``status`` prints. ``elapsed`` is the one clock every line uses."""

    def __init__(
        self,
        *,
        console: Console,
        ready_text: Callable[[float], str],
        elapsed: Callable[[], float],
        document: Callable[[DeploymentStatus], dict[str, Any]],
        render: Callable[[dict[str, Any]], RenderableType],
        panel: bool = True,
    ) -> None:
        self.console, self.ready_text, self.elapsed = console, ready_text, elapsed
        # Without the panel (``up --logs``) the lines simply scroll: a panel redrawn in place under a
        # stream of child lines moves the cursor over rows it no longer owns, and once lost a ready line.
        self.panel = panel
        self.document, self.render = document, render
        self._status: DeploymentStatus | None = None
        self._runner: Any = None
        self._announced = False
        self._clock = StageClock()
        self.live = Live(
            console=console,
            get_renderable=self._panel,
            refresh_per_second=1 / REFRESH_S,
            transient=False,
            redirect_stdout=True,
            redirect_stderr=True,
        )

    # -- above the panel: each line once --------------------------------------------------------
    def _say(self, text: Text | str) -> None:
        self.console.print(text, soft_wrap=True, highlight=False)

    def _stamp(self) -> Text:
        return Text(f"[{self.elapsed():7.1f} s] ", style="dim")

    def event(self, record: dict[str, Any]) -> None:
        """The event log's sink: warnings, errors and the few info events that are news (a reload, an
        operator's request from another terminal); the other info events are what the panel shows."""
        level = LEVELS.get(str(record.get("level")), 20)
        if level < WARNING and record.get("event") not in NEWS:
            return
        fields = " ".join(
            f"{k}={v}" for k, v in record.items() if k not in ("event", "level", "timestamp", "exception")
        )
        style = "bold red" if level > WARNING else "yellow" if level == WARNING else "cyan"
        label = f"{record.get('level')}: " if level >= WARNING else ""
        self._say(
            self._stamp()
            + Text(f"{label}{record.get('event')}", style=style)
            + Text(f"  {fields}" if fields else "", style="dim")
        )

    def __call__(self, event: RunnerEvent) -> None:
        """Runner observer: one line per stage, and the single ready line; the panel's snapshot is
        refreshed at once, so its last frame (after the ordered stop) is the true final state."""
        if self._runner is not None:
            self._status = self._runner.status()
        if isinstance(event, ProcessEvent):
            self._clock.note(event)
            word = _WORDS.get(event.new)
            if word is None or event.new is event.old:
                return
            detail = self._clock.detail(event)
            self._say(
                self._stamp()
                + Text(f"{event.name} ", style="bold")
                + Text(word, style=_STYLE.get(word, ""))
                + Text(f": {detail}" if detail else "")
            )
        elif isinstance(event, DeploymentEvent):
            if event.new is DeploymentState.READY and not self._announced:
                self._announced = True
                self._say(Text(self.ready_text(self.elapsed()), style="bold green"))
            elif event.new is DeploymentState.READY:
                self._say(self._stamp() + Text("deployment ready again", style="green"))
            else:
                style = {"failed": "bold red", "degraded": "yellow"}.get(event.new.value, "")
                self._say(
                    self._stamp()
                    + Text(f"deployment {event.new.value}", style=style)
                    + Text(f": {event.reason}" if event.reason else "")
                )

    # -- the panel --------------------------------------------------------------------------------
    def _panel(self) -> RenderableType:
        if self._status is None:
            return Text("starting supervision...", style="dim")
        stage = Text.from_markup(f"[bold]now[/] {escape(stage_text(self._status, self.elapsed()))}")
        return Group(Text(""), self.render(self.document(self._status)), stage)

    async def serve(self, runner: Any) -> None:
        """Runner service: take a status snapshot every REFRESH_S for the panel to draw."""
        self._runner = runner
        while True:
            self._status = runner.status()
            await anyio.sleep(REFRESH_S)

    def __enter__(self) -> TerminalUp:
        if self.panel:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.panel:
            self.live.stop()  # draws the last frame and leaves it on the screen
