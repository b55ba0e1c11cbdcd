"""Rolling restarts: one replica at a time, never taking a role below its ``min_ready``.

Used by ``restart ROLE`` / ``restart --all`` (the control server) and by reload (for the processes
whose plan changed). For each process, in start order:

1. wait until the OTHER healthy replicas of its group number at least ``min_ready`` (a replica that
   is still coming back from a crash is waited for, never stepped over);
2. restart it through the runner (one stop signal; the runner escalates to SIGKILL of the group
   after the process's stop timeout: Dynamo 1.6.1 ignores a second SIGTERM while it drains);
3. wait until it is healthy again with a new pid, and, for a worker, until the frontend counts as
   many workers of its type as are healthy (registered: new requests can reach it);
4. go on with the next one.

Every refusal is decided before anything is touched: a group with fewer replicas than
``min_ready + 1`` cannot be rolled without a gap in service, and is refused unless the caller
allows downtime. Restarting one replica in isolation (``restart decode-1``) is not a roll and
needs no permission: the operator named that process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import anyio

from supervisor.engine.probes import worker_counts
from supervisor.engine.states import DeploymentState, DeploymentStatus, ProcessState
from supervisor.errors import BadRequestError, ControlError
from supervisor.eventlog import log
from supervisor.plan.spec import Plan, ProcessSpec

if TYPE_CHECKING:
    import httpx

P = ProcessState
REGISTER_POLL_S = 0.1


class Rollable(Protocol):
    """The part of the runner a roll uses."""

    plan: Plan

    def status(self) -> DeploymentStatus: ...
    async def restart(self, name: str) -> None: ...
    async def wait_until(
        self, predicate: Callable[[DeploymentStatus], bool], *, timeout_s: float
    ) -> DeploymentStatus: ...


@dataclass(frozen=True)
class Step:
    """One replica restarted by a roll: its pids and how long its gap lasted."""

    name: str
    old_pid: int | None
    new_pid: int | None
    seconds: float


def members(plan: Plan, group: str) -> tuple[ProcessSpec, ...]:
    return tuple(spec for spec in plan.processes if spec.group == group)


def groups(plan: Plan) -> tuple[str, ...]:
    """Group names in start order (a single process is its own group)."""
    seen: list[str] = []
    for spec in plan.processes:
        if spec.group not in seen:
            seen.append(spec.group)
    return tuple(seen)


def resolve(plan: Plan, target: str | None, *, everything: bool = False) -> tuple[str, ...]:
    """The processes ``restart TARGET`` rolls: a group's replicas, one process, or (``everything``)
    every worker replica, in start order. Raises :class:`BadRequestError` for a name nobody has.

    ``--all`` means the workers: they are what replicas are for. The frontend (one process) and the
    infrastructure servers are restarted by name, with ``--allow-downtime``."""
    if everything:
        return tuple(spec.name for spec in plan.processes if spec.role.is_worker)
    names = [spec.name for spec in plan.processes]
    if target in names:
        return (target,)
    found = members(plan, target or "")
    if found:
        return tuple(spec.name for spec in found)
    roles = [g for g in groups(plan) if len(members(plan, g)) > 1]
    raise BadRequestError(
        f"no process {target!r} in deployment {plan.deployment.name!r} (processes: {', '.join(names)}"
        + (f"; roles: {', '.join(roles)})" if roles else ")")
    )


def downtime(plan: Plan, names: Sequence[str]) -> list[str]:
    """Why rolling ``names`` would take a group below ``min_ready`` (empty: it would not)."""
    problems = []
    for group in groups(plan):
        group_specs = members(plan, group)
        if not any(spec.name in names for spec in group_specs):
            continue
        need = group_specs[0].min_ready
        if len(group_specs) - 1 < need:
            problems.append(
                f"{group} has {len(group_specs)} replica{'s' if len(group_specs) > 1 else ''} "
                f"and needs {need} healthy"
            )
    return problems


def healthy(status: DeploymentStatus, names: Sequence[str]) -> int:
    return sum(1 for p in status.processes if p.name in names and p.state is P.RUNNING)


async def frontend_counts(plan: Plan, client: httpx.AsyncClient) -> dict[str, int] | None:
    """Workers per type as the frontend counts them (None: no frontend answer on this node)."""
    import httpx

    url = plan.deployment.ready_url
    if not url:
        return None
    try:
        response = await client.get(url, timeout=2.0)
        return worker_counts(response.json())
    except (httpx.HTTPError, ValueError):
        return {}


async def wait_registered(
    runner: Rollable, spec: ProcessSpec, client: httpx.AsyncClient, *, timeout_s: float
) -> None:
    """Until the frontend counts at least as many workers of ``spec``'s type as are healthy."""
    kind = spec.role.frontend_type
    if kind is None or not runner.plan.deployment.ready_url:
        return
    same_role = [s.name for s in runner.plan.processes if s.role is spec.role]
    with anyio.fail_after(timeout_s):
        while True:
            counts = await frontend_counts(runner.plan, client)
            if counts is None or counts.get(kind, 0) >= healthy(runner.status(), same_role):
                return
            await anyio.sleep(REGISTER_POLL_S)


async def roll(
    runner: Rollable,
    names: Sequence[str],
    *,
    allow_downtime: bool,
    timeout_s: float,
    client: httpx.AsyncClient,
    on_step: Callable[[Step], Awaitable[None] | None] = lambda step: None,
) -> list[Step]:
    """Restart ``names`` one at a time (see the module docstring); returns the steps taken.

    Raises :class:`BadRequestError` before touching anything when a group would drop below its
    ``min_ready`` and ``allow_downtime`` is false, and :class:`ControlError` naming the replica
    when one does not come back within ``timeout_s`` (the roll stops there: the replicas not yet
    restarted keep serving).
    """
    plan = runner.plan
    ordered = [spec.name for spec in plan.processes if spec.name in names]
    if not allow_downtime:
        problems = downtime(plan, ordered)
        if problems:
            raise BadRequestError(
                f"restarting {', '.join(ordered)} would stop serving: "
                + "; ".join(problems)
                + " (add replicas, or pass --allow-downtime)"
            )
    steps: list[Step] = []
    for name in ordered:
        spec = runner.plan.process(name)
        others = [s.name for s in members(runner.plan, spec.group) if s.name != name]
        need = 0 if allow_downtime else min(spec.min_ready, len(others))
        started = anyio.current_time()
        try:
            await runner.wait_until(_enough(others, need), timeout_s=timeout_s)
        except TimeoutError:
            raise ControlError(
                f"rolling restart stopped before {name}: fewer than {need} other "
                f"{spec.group} replicas are healthy after {timeout_s:g} s"
            ) from None
        before = runner.status().process(name)
        log.info("rolling restart", process=name, pid=before.pid, group=spec.group)
        await runner.restart(name)
        try:
            after = await runner.wait_until(_Back(name, before.state, before.pid), timeout_s=timeout_s)
        except TimeoutError:
            raise ControlError(
                f"rolling restart stopped: {name} is not healthy {timeout_s:g} s after "
                f"its restart (see `lmcache-supervise logs {name}`)"
            ) from None
        proc = after.process(name)
        if proc.state is not P.RUNNING:
            raise ControlError(f"rolling restart stopped: {name} is {proc.state.value} ({proc.reason})")
        try:
            await wait_registered(runner, spec, client, timeout_s=timeout_s)
        except TimeoutError:
            raise ControlError(
                f"rolling restart stopped: the frontend did not count {name} again within {timeout_s:g} s"
            ) from None
        try:  # e.g. after the frontend: the model ready again (unless something else is down anyway)
            await runner.wait_until(_settled, timeout_s=timeout_s)
        except TimeoutError:
            raise ControlError(
                f"rolling restart stopped: the deployment is not ready {timeout_s:g} s after {name} came back"
            ) from None
        step = Step(name, before.pid, proc.pid, round(anyio.current_time() - started, 3))
        steps.append(step)
        result = on_step(step)
        if result is not None:
            await result
    return steps


def _settled(status: DeploymentStatus) -> bool:
    return status.state is DeploymentState.READY or not all(p.state is P.RUNNING for p in status.processes)


def _enough(names: Sequence[str], need: int) -> Callable[[DeploymentStatus], bool]:
    return lambda status: healthy(status, names) >= need


class _Back:
    """``wait_until`` predicate: ``name`` runs again with a new pid, or it ended for good.

    The restart only schedules the work, so a terminal state counts once the process has moved
    from where it was (a failed replica restarted and failing again is an answer, not a hang).
    """

    def __init__(self, name: str, old_state: ProcessState, old_pid: int | None) -> None:
        self.name, self.old_state, self.old_pid = name, old_state, old_pid
        self.moved = False

    def __call__(self, status: DeploymentStatus) -> bool:
        proc = status.process(self.name)
        self.moved = self.moved or proc.state is not self.old_state or proc.pid != self.old_pid
        if not self.moved:
            return False
        if proc.state in (P.FAILED, P.EXITED, P.STOPPED):
            return True
        return proc.state is P.RUNNING and proc.pid is not None and proc.pid != self.old_pid
