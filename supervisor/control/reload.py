"""Reload: re-read the profile and restart only the processes whose plan changed.

Triggered by SIGHUP (the runner's signal loop only enqueues; one reload runs at a time) or by
``lmcache-supervise reload``, which sends that SIGHUP and waits for the outcome this module writes
to ``<state_dir>/reload.json``.

The steps: re-load and re-render the same profile with the same ``--set``/``--model`` overrides
``up`` was given; refuse, changing nothing, a profile that no longer validates or that renames the
deployment; otherwise compare the plans process by process (a :class:`~supervisor.plan.spec.ProcessSpec`
is a frozen value: any difference in argv, env, probes, restart policy, ... is a change), stop the
removed processes, restart the changed ones, start the added ones, and leave every other process
running untouched. Preflight is not run again: the running deployment holds its own ports and GPUs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio

from supervisor.control import client, rolling
from supervisor.control.client import Endpoint
from supervisor.engine.states import DeploymentState, DeploymentStatus, ProcessState
from supervisor.errors import ControlError, SupervisorError
from supervisor.eventlog import log
from supervisor.plan.policies import startup_budget_s
from supervisor.plan.spec import Plan
from supervisor.redact import redact_text

OUTCOME_FILE = "reload.json"
#: Deployment fields a reload cannot change in place: they name the deployment and its state.
# credentials_file: turning the cluster's authentication on or off changes etcd's data (its auth is
# kept there) and every node's credentials at once: a stop and a start, never a reload.
FIXED_FIELDS = ("name", "state_dir", "credentials_file")


@dataclass(frozen=True)
class PlanDiff:
    """Process names by what a reload does to them, each in the new (or, for removed, old) start order."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def describe(self) -> str:
        parts = [
            f"{verb} {', '.join(names)}"
            for verb, names in (
                ("restarted", self.changed),
                ("started", self.added),
                ("stopped", self.removed),
            )
            if names
        ]
        return "; ".join(parts) or "nothing changed"


def diff(old: Plan, new: Plan) -> PlanDiff:
    """What changed between two plans, compared process spec by process spec."""
    old_specs = {spec.name: spec for spec in old.processes}
    new_names = [spec.name for spec in new.processes]
    return PlanDiff(
        added=tuple(n for n in new_names if n not in old_specs),
        removed=tuple(spec.name for spec in old.processes if spec.name not in new_names),
        changed=tuple(s.name for s in new.processes if s.name in old_specs and old_specs[s.name] != s),
        unchanged=tuple(s.name for s in new.processes if s.name in old_specs and old_specs[s.name] == s),
    )


def refusal(old: Plan, new: Plan) -> str | None:
    """Why ``new`` cannot replace ``old`` in a running supervisor, or None."""
    for name in FIXED_FIELDS:
        before, after = getattr(old.deployment, name), getattr(new.deployment, name)
        if before != after:
            return (
                f"the profile now gives deployment {name} {after!r} instead of {before!r}; "
                f"a running deployment cannot change it: stop it and start it again"
            )
    return None


@dataclass(frozen=True)
class Outcome:
    """What a reload did, as written to ``reload.json`` for the ``reload`` command."""

    pid: int
    serial: int
    ok: bool
    message: str
    restarted: tuple[str, ...] = ()
    started: tuple[str, ...] = ()
    stopped: tuple[str, ...] = ()
    applied: bool = False  # not ok, yet the new plan is in place (a rolling restart stopped midway)


class Applies(Protocol):
    """The part of the runner a reload uses."""

    plan: Plan

    async def restart(self, name: str) -> None: ...

    def status(self) -> DeploymentStatus: ...

    async def apply(
        self, plan: Plan, *, restart: tuple[str, ...], start: tuple[str, ...], stop: tuple[str, ...]
    ) -> None: ...

    async def wait_until(
        self, predicate: Callable[[DeploymentStatus], bool], *, timeout_s: float
    ) -> DeploymentStatus: ...


class Reloader:
    """Runs reloads for one supervisor; ``await reloader(runner)`` once per SIGHUP.

    ``load`` re-reads and re-renders the profile (it raises a SupervisorError for a bad one);
    ``on_begin``/``on_end`` get a one-line status (the sd_notify bridge sends RELOADING=1 / READY=1).
    """

    def __init__(
        self,
        load: Callable[[], Plan],
        *,
        on_begin: Callable[[str], None] = lambda _: None,
        on_end: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.load, self.on_begin, self.on_end = load, on_begin, on_end
        self.serial = 0

    async def __call__(self, runner: Applies) -> Outcome:
        self.serial += 1
        self.on_begin(f"reloading: re-reading profile {runner.plan.deployment.profile}")
        try:
            outcome = await self._reload(runner)
        except Exception as exc:  # a bug here must not end supervision; say so and keep running
            log.exception("reload failed; every process keeps running")
            outcome = self._outcome(False, f"reload failed: {exc}")
        write_outcome(Path(runner.plan.deployment.state_dir), outcome)
        self.on_end(("reloaded: " if outcome.ok else "reload refused: ") + outcome.message)
        return outcome

    async def _reload(self, runner: Applies) -> Outcome:
        try:
            new = await anyio.to_thread.run_sync(self.load)
        except SupervisorError as exc:
            log.error(
                "reload refused: the profile no longer validates; every process keeps running", error=str(exc)
            )
            return self._outcome(False, str(exc))
        why = refusal(runner.plan, new)
        if why is not None:
            log.error("reload refused; every process keeps running", error=why)
            return self._outcome(False, why)
        changes = diff(runner.plan, new)
        log.info(
            "reload",
            restart=list(changes.changed),
            start=list(changes.added),
            stop=list(changes.removed),
            keep=list(changes.unchanged),
        )
        # Worker replicas whose role keeps min_ready while one is down are rolled one at a time after
        # the swap; everything else (the frontend, a role of one) restarts at once, as a reload must
        # make the new plan true without asking for permission.
        rolled = tuple(
            n for n in changes.changed if new.process(n).role.is_worker and not rolling.downtime(new, [n])
        )
        at_once = tuple(n for n in changes.changed if n not in rolled)
        was_ready = runner.status().state is DeploymentState.READY
        await runner.apply(new, restart=at_once, start=changes.added, stop=changes.removed)
        touched = (*at_once, *changes.added)
        budget = max(
            (startup_budget_s(new.process(name)) for name in changes.changed + changes.added), default=0.0
        )

        def settled(status: DeploymentStatus) -> bool:
            # Done once what restarted is up and, if the deployment was ready before, ready again.
            up = all(status.process(n).state is ProcessState.RUNNING for n in touched)
            return up and (not was_ready or status.state is DeploymentState.READY)

        try:
            await runner.wait_until(settled, timeout_s=budget + new.deployment.ready_timeout_s)
        except TimeoutError:
            log.warning("reload applied, but the deployment is not ready again yet", processes=list(touched))
        message = changes.describe() + (f" (one at a time: {', '.join(rolled)})" if rolled else "")
        if rolled:
            import httpx  # only a rolling reload needs it: kept off the start path of `up`

            try:
                async with httpx.AsyncClient(trust_env=False) as client:
                    await rolling.roll(
                        runner,
                        rolled,
                        allow_downtime=False,
                        timeout_s=budget + new.deployment.ready_timeout_s,
                        client=client,
                    )
            except SupervisorError as exc:
                log.error("reload: the rolling restart stopped", error=str(exc))
                failed = self._outcome(False, str(exc), changes)
                return dataclasses.replace(failed, applied=True)
        return self._outcome(True, message, changes)

    def _outcome(self, ok: bool, message: str, changes: PlanDiff | None = None) -> Outcome:
        return Outcome(
            pid=os.getpid(),
            serial=self.serial,
            ok=ok,
            message=redact_text(message),  # a profile error may quote a URL with its password
            restarted=changes.changed if changes else (),
            started=changes.added if changes else (),
            stopped=changes.removed if changes else (),
        )


# ---- the outcome file: how `lmcache-supervise reload` learns what happened -----------------


def write_outcome(state_dir: Path, outcome: Outcome) -> None:
    """Replace ``reload.json`` whole (a reader never sees half of it); a failure costs only the report."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=state_dir, prefix=".reload.", delete=False) as tmp:
            json.dump(asdict(outcome), tmp)
        os.replace(tmp.name, state_dir / OUTCOME_FILE)
    except OSError as exc:
        log.warning("could not write the reload outcome", path=str(state_dir / OUTCOME_FILE), error=str(exc))


def read_outcome(state_dir: Path) -> Outcome | None:
    try:
        data: dict[str, Any] = json.loads((state_dir / OUTCOME_FILE).read_text())
    except (OSError, ValueError):
        return None
    for key in ("restarted", "started", "stopped"):
        data[key] = tuple(data.get(key, ()))
    try:
        return Outcome(**data)
    except TypeError:
        return None


def request(endpoint: Endpoint, *, timeout_s: float) -> Outcome:
    """Ask the running supervisor to reload (over its control socket: on a terminal, SIGHUP means
    the terminal went away) and wait for an outcome newer than the last one it wrote."""
    pid, state_dir = endpoint.pid, endpoint.state_dir
    before = read_outcome(state_dir)
    serial = before.serial if before is not None and before.pid == pid else 0
    client.request(endpoint, {"op": "reload"})
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        outcome = read_outcome(state_dir)
        if outcome is not None and outcome.pid == pid and outcome.serial > serial:
            return outcome
        if time.monotonic() >= deadline:
            raise ControlError(
                f"supervisor pid {pid} did not report a reload within {timeout_s:g} s (see its log)"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
