"""After the soak: what happened to each fault, and whether the client only failed inside fault windows.

Everything is judged from the supervisor's own events (arrival-stamped on our monotonic clock) and
the client's request log. A fault's window runs from its injection until the deployment is ready
again *after* the fault healed: for a restarted process, the first ``deployment ready`` after its
new incarnation turned running (the gate then has seen the model ready and a smoke request answered);
for a short stop, the SIGCONT, or the next ``deployment ready`` if the supervisor noticed the stop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from harness import DEPLOYMENT_STATES, NAMES, Event

from soakkit.faults import Fault, Request

SETTLE_S = 1.0  # a probe failure seen just after the SIGCONT still belongs to that stop
ARRIVAL_SLACK_S = 0.2  # events reach us through a pipe: a ready event is a few ms late


@dataclass(frozen=True)
class Judged:
    """One fault and what the supervisor did about it."""

    fault: Fault
    restarted: bool  # a new incarnation of the target started after the fault
    liveness: bool  # ... because the liveness probe killed the frozen one
    recovered: float | None  # when the deployment was ready again (monotonic), None: never

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered is None else self.recovered - self.fault.injected


class Timeline:
    """The deployment's and the processes' states over time, from the supervisor's events."""

    def __init__(self, events: Sequence[Event]) -> None:
        self.events = list(events)
        named = [(e.at, e.name.removeprefix("deployment ")) for e in self.events if "deployment" in e.data]
        self.deployment = [(at, state) for at, state in named if state in DEPLOYMENT_STATES]

    def state_at(self, t: float) -> str:
        state = "starting"
        for at, new in self.deployment:
            if at > t:
                break
            state = new
        return state

    def ready_from(self, t: float) -> float | None:
        """``t`` if the deployment is ready then, else the next time it turns ready."""
        if self.state_at(t) == "ready":
            return t
        return next((at for at, new in self.deployment if at > t and new == "ready"), None)

    def process(self, name: str, event: str, after: float) -> list[Event]:
        return [e for e in self.events if e.at >= after and e.name == event and e.data.get("process") == name]


def judge(faults: Sequence[Fault], timeline: Timeline) -> list[Judged]:
    out = []
    for fault in sorted(faults, key=lambda f: f.injected):
        newer = [
            e
            for e in timeline.process(fault.target, "process starting", fault.injected)
            if e.data.get("pid") != fault.pid
        ]
        # Only a kill while this stop lasted is its doing (the same pid may be stopped again later).
        killed_by_liveness = fault.kind == "SIGSTOP" and any(
            e.data.get("pid") == fault.pid
            and "liveness" in str(e.data.get("reason"))
            and e.at <= fault.ended + SETTLE_S
            for e in timeline.process(fault.target, "process stopping", fault.injected)
        )
        restarted = bool(newer) and (fault.kind == "SIGKILL" or killed_by_liveness)
        if restarted:
            # Its first new incarnation turning running (or a later one, when a second fault hit that one).
            running = [e.at for e in timeline.process(fault.target, "process running", newer[0].at)]
            anchor = running[0] if running else None
        else:
            anchor = fault.ended
            noticed = [
                at
                for at, new in timeline.deployment
                if fault.injected < at <= fault.ended + SETTLE_S and new != "ready"
            ]
            if noticed:
                anchor = max(anchor, noticed[-1])
        recovered = timeline.ready_from(anchor) if anchor is not None else None
        out.append(Judged(fault, restarted, killed_by_liveness, recovered))
    return out


def windows(judged: Sequence[Judged], end: float) -> list[tuple[float, float]]:
    """Each fault's window: injection .. recovery (+ event arrival slack), or .. ``end`` if never healed."""
    return [
        (j.fault.injected, (j.recovered if j.recovered is not None else end) + ARRIVAL_SLACK_S)
        for j in judged
    ]


def outside_windows(requests: Sequence[Request], judged: Sequence[Judged], end: float) -> list[Request]:
    """Requests that overlap no fault window (the verdict counts the failed ones among them)."""
    spans = windows(judged, end)
    return [r for r in requests if not any(r.started <= hi and r.ended >= lo for lo, hi in spans)]


def coverage(judged: Sequence[Judged], start: float, end: float) -> float:
    """The share of ``start .. end`` inside some fault window: how much of the run the verdict excuses."""
    covered, reach = 0.0, start
    for lo, hi in sorted(windows(judged, end)):
        lo, hi = max(lo, reach), min(hi, end)
        if hi > lo:
            covered += hi - lo
            reach = hi
    return covered / (end - start) if end > start else 0.0


def restart_counts(judged: Sequence[Judged], events: Sequence[Event]) -> dict[str, dict[str, int]]:
    """Per process: restarts the faults explain (SIGKILLs + liveness kills) and those the supervisor made."""
    expected = Counter(j.fault.target for j in judged if j.fault.kind == "SIGKILL" or j.liveness)
    starts = Counter(e.data.get("process") for e in events if e.name == "process starting")
    return {name: {"expected": expected[name], "observed": max(starts[name] - 1, 0)} for name in NAMES}


def stop_verdicts(judged: Sequence[Judged]) -> list[str]:
    """Documented behaviour for stops: short ones never restart, long ones always do (liveness)."""
    problems = []
    for j in judged:
        f = j.fault
        if f.kind == "SIGKILL" and not j.restarted:
            problems.append(f"{f.target} pid {f.pid} SIGKILLed but never restarted")
        elif f.kind == "SIGSTOP" and f.long and not j.liveness:
            problems.append(f"{f.target} pid {f.pid} stopped {f.held_s:.1f} s without a liveness restart")
        elif f.kind == "SIGSTOP" and not f.long and j.liveness:
            problems.append(f"{f.target} pid {f.pid} restarted after a short stop of {f.held_s:.1f} s")
        if j.recovered is None:
            problems.append(f"{f.kind} of {f.target} pid {f.pid}: the deployment never became ready again")
    return problems
