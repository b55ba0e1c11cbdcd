"""The GPU guard: a runner service that turns GPU faults into quarantine and moves workers to spares.

It runs a :class:`~supervisor.host.gpuwatch.GpuWatcher` over every GPU the plan uses plus the
profile's ``spare_gpus`` and takes its faults through a worker thread (the event loop never waits
on NVML). What a fault means is the Xid table's call (:mod:`supervisor.host.xid`):

* **fatal** (Xid 79, 48, 94/95, 119, a double-bit ECC error, a remap failure, a lost GPU, ...): the
  GPU is quarantined. The runner never spawns a process onto a quarantined GPU (its spawn gate,
  :meth:`~supervisor.engine.runner.Runner.update_gpus`). Each process using it is moved: with a free,
  healthy spare of the same model and memory size, the process gets the spare in its spec (same
  name, ``CUDA_VISIBLE_DEVICES`` rewritten) and is restarted there; without one it is stopped and
  waits, its reason saying why, while the rest keep serving and the deployment reports degraded.
* **app** (Xid 13, 31, 43, ...): the process crashed, the GPU is fine: recorded, and the runner's
  ordinary restart puts it back on the same GPU.
* **info** (a pending remap, thermal slowdown, PCIe replays): recorded and logged.

A quarantine ends only by an operator's ``lmcache-supervise gpus clear N`` (after a reset); a
process waiting for that GPU then starts on it again. :func:`choose_spares` is the pure decision.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import anyio
import anyio.to_thread
import psutil

from supervisor.engine.states import (
    DeploymentState,
    DeploymentStatus,
    GpuEvent,
    GpuStatus,
    GpuUser,
    ProcessState,
)
from supervisor.errors import GpuError
from supervisor.eventlog import log
from supervisor.host.gpuhealth import GpuFault
from supervisor.host.gpuwatch import GpuReading, GpuWatcher
from supervisor.plan.spec import Plan, ProcessSpec

WAIT_S = 1.0  # how long one thread-side wait for faults lasts (bounds the shutdown delay)
VIEW_REFRESH_S = 10.0  # counters and memory users in the view follow the watcher's reads


class Supervised(Protocol):
    """The runner, as the guard uses it."""

    plan: Plan
    gpu_clearer: Callable[[int], Any] | None

    def status(self) -> DeploymentStatus: ...
    def update_gpus(self, gpus: tuple[GpuStatus, ...], event: GpuEvent | None = None) -> None: ...
    async def apply(self, plan: Plan, *, restart: Iterable[str] = ()) -> None: ...
    async def restart(self, name: str) -> None: ...


Watcher = Callable[[tuple[int, ...]], GpuWatcher]


def watched_gpus(plan: Plan) -> tuple[int, ...]:
    """Every GPU a process of the plan uses, plus the spares."""
    return tuple(sorted({g for spec in plan.processes for g in spec.gpus} | set(plan.deployment.spare_gpus)))


def choose_spares(
    bad: Iterable[int],
    *,
    candidates: Iterable[int],
    in_use: set[int],
    quarantined: set[int],
    kind: Mapping[int, tuple[str, int | None]],
) -> dict[int, int] | None:
    """A replacement for each bad GPU among ``candidates``: free, healthy, same model and memory size.

    None when any one of them has no replacement (a tensor-parallel worker needs all its GPUs).
    """
    taken: set[int] = set()
    chosen: dict[int, int] = {}
    for gpu in bad:
        want = kind.get(gpu)
        found = next(
            (
                c
                for c in sorted(candidates)
                if c not in in_use
                and c not in quarantined
                and c not in taken
                and want is not None
                and kind.get(c) == want
            ),
            None,
        )
        if found is None:
            return None
        chosen[gpu] = found
        taken.add(found)
    return chosen


def moved_spec(spec: ProcessSpec, moves: Mapping[int, int]) -> ProcessSpec:
    """``spec`` on its new GPUs: the same process (same name, ports, logs) with GPUs swapped."""
    gpus = tuple(moves.get(g, g) for g in spec.gpus)
    env = dict(spec.env)
    if "CUDA_VISIBLE_DEVICES" in env:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    return dataclasses.replace(spec, gpus=gpus, env=env)


class GpuGuard:
    """``services=[guard.serve]``. ``watcher`` builds the watcher for the GPU indices (tests: a fake NVML)."""

    def __init__(self, plan: Plan, *, watcher: Watcher | None = None) -> None:
        self.plan = plan
        self._make_watcher: Watcher = watcher or (lambda indices: GpuWatcher(indices))
        self._watcher: GpuWatcher | None = None
        self._quarantine: dict[int, GpuFault] = {}
        self._runner: Supervised | None = None
        self._lock = anyio.Lock()  # one quarantine or clear at a time

    async def serve(self, runner: Supervised) -> None:
        indices = watched_gpus(runner.plan)
        if not indices:
            return
        watcher = self._make_watcher(indices)
        try:
            await anyio.to_thread.run_sync(watcher.start)
        except Exception as exc:  # no driver, no library: supervision goes on without the guard
            log.error(
                "GPU watcher not started; GPU faults will not be seen", gpus=list(indices), error=str(exc)
            )
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(watcher.close)
            return
        self._watcher, self._runner = watcher, runner
        runner.gpu_clearer = self.clear
        log.info("watching GPUs", gpus=list(indices), spares=list(runner.plan.deployment.spare_gpus))
        try:
            next_view = 0.0
            while True:
                faults = await anyio.to_thread.run_sync(watcher.faults, WAIT_S, abandon_on_cancel=True)
                try:
                    for fault in faults:
                        await self._handle(runner, fault)
                    await self._rehome(runner)
                except Exception:  # a bug here must cost one fault's handling, never supervision
                    log.exception("GPU guard failed to act on a fault; the spawn gate still holds")
                if time.monotonic() >= next_view:
                    next_view = time.monotonic() + VIEW_REFRESH_S
                    runner.update_gpus(await anyio.to_thread.run_sync(self.view, runner.status()))
        finally:
            runner.gpu_clearer = None
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(watcher.close)

    # ---- faults -----------------------------------------------------------------------------

    async def _handle(self, runner: Supervised, fault: GpuFault) -> None:
        if not fault.fatal or fault.gpu in self._quarantine:
            runner.update_gpus(
                self.view(runner.status()), self._event(fault, quarantined=fault.gpu in self._quarantine)
            )
            return
        async with self._lock:
            self._quarantine[fault.gpu] = fault
            log.error(
                "GPU quarantined",
                gpu=fault.gpu,
                uuid=fault.uuid,
                fault=fault.finding.what,
                meaning=fault.finding.meaning,
                action=fault.finding.action.value,
            )
            # First the gate: from here on nothing spawns onto this GPU, whatever restarts it.
            runner.update_gpus(self.view(runner.status()), self._event(fault, quarantined=True))
            if runner.status().state in (DeploymentState.STOPPING, DeploymentState.STOPPED):
                return
            for spec in [s for s in runner.plan.processes if fault.gpu in s.gpus]:
                await self._move(runner, spec)
            runner.update_gpus(self.view(runner.status()))  # who is on which GPU now

    async def _rehome(self, runner: Supervised) -> None:
        """Move a process the spawn gate holds, once a spare fits: a reload that put it back on its
        quarantined profile GPU, or a GPU freed since (a worker removed by a reload, a cleared one)."""
        if not self._quarantine:
            return
        status = runner.status()
        if status.state in (DeploymentState.STOPPING, DeploymentState.STOPPED):
            return
        waiting = {p.name for p in status.processes if p.state is ProcessState.WAITING}
        held = [
            s
            for s in runner.plan.processes
            if s.name in waiting and any(g in self._quarantine for g in s.gpus)
        ]
        if not held:
            return
        async with self._lock:
            moved = [await self._move(runner, spec, quiet=True) for spec in held]
            if any(moved):
                runner.update_gpus(self.view(runner.status()))

    async def _move(self, runner: Supervised, spec: ProcessSpec, *, quiet: bool = False) -> bool:
        """Restart ``spec`` on spares for its quarantined GPUs (True), or stop it to be held (False)."""
        plan = runner.plan
        readings = {r.index: r for r in self._readings()}
        bad = [g for g in spec.gpus if g in self._quarantine]
        moves = choose_spares(
            bad,
            candidates=watched_gpus(self.plan),  # the spares, and any GPU freed by an earlier move
            in_use={g for s in plan.processes for g in s.gpus},
            quarantined=set(self._quarantine),
            kind={i: (r.name, r.total_bytes) for i, r in readings.items()},
        )
        if moves is None:
            if quiet:
                return False
            log.error(
                "no spare GPU for a process on a quarantined GPU; it stays stopped, the rest keep serving",
                process=spec.name,
                gpus=list(spec.gpus),
                spares=list(plan.deployment.spare_gpus),
            )
            try:
                proc = runner.status().process(spec.name)
            except KeyError:  # a reload removed it meanwhile
                return False
            if proc.state.is_live:
                await runner.restart(spec.name)  # stopped now; the spawn gate holds it
            return False
        new = moved_spec(spec, moves)
        log.warning(
            "moving a process to a spare GPU",
            process=spec.name,
            moves={str(k): v for k, v in moves.items()},
        )
        processes = tuple(new if s.name == spec.name else s for s in plan.processes)
        await runner.apply(dataclasses.replace(plan, processes=processes), restart=[spec.name])
        return True

    async def clear(self, index: int) -> str:
        """End GPU ``index``'s quarantine (an operator reset it); a process held for it starts again."""
        runner = self._runner
        if runner is None or index not in watched_gpus(self.plan):
            raise GpuError(index, f"GPU {index} is not watched by this deployment")
        async with self._lock:
            fault = self._quarantine.pop(index, None)
            if fault is None:
                raise GpuError(index, f"GPU {index} is not quarantined")
            log.warning(
                "GPU quarantine cleared by the operator", gpu=index, uuid=fault.uuid, was=fault.finding.what
            )
            runner.update_gpus(
                self.view(runner.status()),
                GpuEvent(index, "quarantine cleared", False, time.monotonic()),
            )
        return f"GPU {index} back in service (was quarantined for {fault.finding.what})"

    # ---- the view ---------------------------------------------------------------------------

    def _readings(self) -> tuple[GpuReading, ...]:
        return self._watcher.readings() if self._watcher is not None else ()

    def _event(self, fault: GpuFault, *, quarantined: bool) -> GpuEvent:
        return GpuEvent(fault.gpu, fault.describe(), quarantined, time.monotonic())

    def view(self, status: DeploymentStatus) -> tuple[GpuStatus, ...]:
        """The GPUs as ``status``, ``gpus`` and metrics show them (psutil reads: call it off the loop
        when it matters)."""
        runner = self._runner
        plan = runner.plan if runner is not None else self.plan
        ours = {p.pid: p.name for p in status.processes if p.pid is not None}
        spares = set(self.plan.deployment.spare_gpus)
        out = []
        for r in self._readings():
            fault = self._quarantine.get(r.index)
            out.append(
                GpuStatus(
                    index=r.index,
                    uuid=r.uuid,
                    name=r.name,
                    total_bytes=r.total_bytes,
                    spare=r.index in spares,
                    quarantine=f"{fault.finding.what}: {fault.finding.meaning}" if fault else None,
                    last_fault=r.last_fault,
                    faults=dict(r.counts.by_class),
                    counters=r.counters,
                    users=tuple(GpuUser(pid, used, _owner(pid, ours)) for pid, used in r.processes),
                    assigned_to=tuple(s.name for s in plan.processes if r.index in s.gpus),
                )
            )
        return tuple(out)


def _owner(pid: int, ours: Mapping[int, str]) -> str | None:
    """The supervised process ``pid`` belongs to (itself or an ancestor), if any."""
    if pid in ours:
        return ours[pid]
    try:
        for parent in psutil.Process(pid).parents():
            if parent.pid in ours:
                return ours[parent.pid]
    except (psutil.Error, OSError):
        pass
    return None
