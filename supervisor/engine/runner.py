"""The supervisor: start a plan in dependency order, watch it, restart what dies, stop it in reverse.

One anyio task per process runs its lifecycle (wait for dependencies -> spawn -> startup probe ->
readiness/liveness -> exit -> restart decision); one more task gates the deployment (model-ready
URL, then a smoke request). Exits are seen through pidfds the moment they happen; probes run fast
(<= 100 ms) only while something is starting. Per-process state is keyed by name so a later
``apply(new_plan)`` can swap specs one process at a time.

The narrow API other features use (control socket, metrics, sd_notify) is: :meth:`Runner.status`,
:meth:`Runner.subscribe` (synchronous observers of :data:`~supervisor.engine.states.RunnerEvent`),
:meth:`Runner.start` / :meth:`Runner.stop` / :meth:`Runner.restart`,
:meth:`Runner.request_shutdown` and :meth:`Runner.wait_until`.
:func:`supervisor.engine.foreground.run` is the blocking entry point with signals and the pid file.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.abc

from supervisor.engine.core import LOG_FLUSH_S, D, GpuPids, LazyHttpClient, Observer, P, _needs_tls, _Slot
from supervisor.engine.lifecycle import Lifecycles
from supervisor.engine.logs import ChildOutput, flush_all
from supervisor.engine.probes import FAST_PROBE_S, deployment_ready, smoke
from supervisor.engine.process import Guardian
from supervisor.engine.states import (
    DeploymentStatus,
    GpuEvent,
    GpuStatus,
    ProbeResult,
)
from supervisor.errors import GpuError
from supervisor.eventlog import log
from supervisor.plan.spec import Plan

if TYPE_CHECKING:
    import httpx

__all__ = ["GpuPids", "Observer", "Runner", "Service"]

Service = Callable[["Runner"], Coroutine[Any, Any, None]]


class Runner(Lifecycles):
    """Supervises one :class:`~supervisor.plan.spec.Plan`; run it with :meth:`serve`."""

    #: Queues a re-read of the profile; set by whoever can reload (``foreground.run``).
    reload_hook: Callable[[], None] | None = None

    def request_reload(self) -> bool:
        """Queue a reload (the ``reload`` command's way in); False when nothing can reload this runner."""
        if self.reload_hook is None:
            return False
        self.reload_hook()
        return True

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        """Call ``observer(event)`` on every state change, synchronously; it must not block."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    def update_gpus(self, gpus: tuple[GpuStatus, ...], event: GpuEvent | None = None) -> None:
        """The GPU guard's new view; with ``event`` (a quarantine, a clear, a fault) observers hear of it.

        A process whose GPUs include a quarantined one is held before its next spawn (see
        :meth:`_gpu_hold`): never started onto a broken GPU, whatever restarted it.
        """
        self._gpus = gpus
        if event is not None:
            self._emit(event)
        else:  # no observer needs a counter refresh, but a waiter on the status may
            self._changed.set()
            self._changed = anyio.Event()

    async def clear_gpu(self, index: int) -> str:
        """An operator's ``gpus clear``: end GPU ``index``'s quarantine; returns what was done."""
        if self.gpu_clearer is None:
            raise GpuError(index, f"no GPU is watched in deployment {self.plan.deployment.name!r}")
        return await self.gpu_clearer(index)

    async def wait_until(
        self, predicate: Callable[[DeploymentStatus], bool], *, timeout_s: float
    ) -> DeploymentStatus:
        """Wait for a status satisfying ``predicate``; raises TimeoutError after ``timeout_s``."""
        with anyio.fail_after(timeout_s):
            while not predicate(status := self.status()):
                await self._changed.wait()
        return status

    def own_children(self) -> set[int]:
        """Pids this runner spawned and still owns (each child's leader, the guardian): an orphan
        reaper must leave them to their own exit watchers."""
        pids = {s.child.pid for s in self._slots.values() if s.child is not None and s.child.running}
        guardian = getattr(self, "_guardian", None)
        if guardian is not None:
            pids.add(guardian.pid)
        return pids

    async def stop(self, name: str) -> None:
        """Stop one process (its lifecycle ends; no restart) and wait until its group is gone."""
        async with self._operating(name) as slot:
            if slot is not None:
                await self._end_lifecycle(slot)
                await self._stop_child(slot, "stop requested")
                if slot.state is P.FAILED:  # a failed replica waiting out its retry delay: no more retries
                    self._set(slot, P.STOPPED, "stop requested")

    async def start(self, name: str) -> None:
        """Start a stopped, exited or failed process (its crash-loop history is forgotten); one
        waiting out a backoff or a failed replica's retry delay starts now; a live one is left alone."""
        async with self._operating(name) as slot:
            if slot is not None and not self._shutdown.is_set():
                if slot.state in (P.FAILED, P.BACKOFF):
                    await self._end_lifecycle(slot)
                    if slot.state.is_live:  # the backoff ran out while it ended: that child goes
                        await self._stop_child(slot, "start requested")
                self._start_fresh(slot)

    async def restart(self, name: str) -> None:
        """Restart one process now, without backoff; it re-waits for its dependencies.

        A live process gets one stop signal (SIGKILL of its group after its stop timeout); one
        that is not running (backing off, failed, waiting, stopped) is started again at once.
        """
        async with self._operating(name) as slot:
            if slot is None or self._shutdown.is_set():
                return
            running = slot.finished is not None and not slot.finished.is_set()
            if running and slot.state in (P.STARTING, P.RUNNING, P.NOT_READY) and slot.kick is not None:
                slot.kick.set()  # its lifecycle stops the child and starts it again
                return
            await self._end_lifecycle(slot)
            if slot.state.is_live:  # its own stop (a failed liveness probe) was under way: finish it
                await self._stop_child(slot, "restart requested")
            self._start_fresh(slot)

    async def apply(
        self, plan: Plan, *, restart: Iterable[str] = (), start: Iterable[str] = (), stop: Iterable[str] = ()
    ) -> None:
        """Swap in ``plan`` (a reload): stop ``stop``, restart ``restart`` with its new spec, start
        ``start``; every other process keeps running untouched. Nothing starts once shutting down."""
        async with self._applying:  # one reload at a time; operations still interleave per process
            await self._apply(plan, restart=tuple(restart), start=tuple(start), stop=tuple(stop))

    async def _apply(
        self, plan: Plan, *, restart: tuple[str, ...], start: tuple[str, ...], stop: tuple[str, ...]
    ) -> None:
        for name in reversed([s.name for s in self.plan.processes if s.name in stop]):
            await self.stop(name)
            self._slots.pop(name).output.close()
        for name in restart:
            await self.stop(name)
        if start or stop:
            self._gate.worker_baseline = None  # the frontend's worker counts change with the set
        old = self._slots
        self.plan = plan
        self._slots = {}
        for spec in plan.processes:  # plan order is start order: shutdown walks it backwards
            slot = old.get(spec.name) or _Slot(
                spec, ChildOutput(spec.name, spec.log_file, self._log_options, self._echo)
            )
            if slot.spec.log_file != spec.log_file:
                slot.output.close()
                slot.output = ChildOutput(spec.name, spec.log_file, self._log_options, self._echo)
            slot.spec = spec  # the dead child stays: GPU hygiene waits for it to let go
            self._slots[spec.name] = slot
        for name in (*restart, *start):
            if self._shutdown.is_set():
                return
            await self.start(name)

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        """Run until :meth:`request_shutdown` (or a required process fails); return the exit code."""
        self._started_at = time.monotonic()
        self._guardian = Guardian()
        self._client = cast("httpx.AsyncClient", LazyHttpClient(verify=_needs_tls(self.plan)))
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for slot in self._slots.values():
                    self._launch(slot)
                tg.start_soon(self._run_gate)
                task_status.started()
                await self._shutdown.wait()
                await self._stop_all()
                tg.cancel_scope.cancel()
        finally:
            for slot in self._slots.values():  # only reached with live children after a crash of ours
                if slot.child is not None and slot.child.running:
                    slot.child.kill_now()
                slot.output.close()
                if slot.spec.multiproc_dir:
                    shutil.rmtree(slot.spec.multiproc_dir, ignore_errors=True)
            self._guardian.close()  # EOF: it SIGKILLs whatever is still registered
            with anyio.CancelScope(shield=True):
                await self._client.aclose()
            flush_all(LOG_FLUSH_S)  # the last lines on disk before we return (bounded: a stalled disk)
        return self._exit_code

    @contextlib.asynccontextmanager
    async def _operating(self, name: str) -> AsyncIterator[_Slot | None]:
        """Hold ``name``'s operation lock; yields None when a reload removed it meanwhile."""
        slot = self._slot(name)  # an unknown name is the caller's mistake: StartError, at once
        async with slot.ops:
            yield slot if self._slots.get(name) is slot else None

    def _start_fresh(self, slot: _Slot) -> None:
        """Under ``slot.ops``: launch a lifecycle unless one runs; crash-loop history is forgotten."""
        if slot.finished is not None and not slot.finished.is_set():
            return
        slot.forget_crashes()
        slot.failed_retries = 0
        # Queued at once, before the lifecycle task runs: whoever waits for the process to come back
        # sees it leave stopped/failed now, never mistakes that state for the answer.
        self._set(slot, P.WAITING, "start requested")
        self._launch(slot)

    async def _run_gate(self) -> None:
        """Turn the deployment READY: all required processes up, model ready, one smoke request."""
        deadline = self._started_at + self.plan.deployment.ready_timeout_s
        while self._deployment not in (D.FAILED, D.STOPPING, D.STOPPED):
            dep = self.plan.deployment  # re-read: a reload may have changed the URLs or the smoke test
            if self._gate.open or not self._required_running():
                await self._changed.wait()
                continue
            generation = self._gate.generation
            result = ProbeResult(ok=True, latency_s=0.0)
            if dep.ready_url:
                # Remember how many workers per type the frontend may count (see _baseline); later
                # gates (after restarts) wait until stale registrations are gone again.
                result, counts = await deployment_ready(
                    dep.ready_url, client=self._client, max_workers=self._gate.worker_baseline
                )
                if result.ok:
                    self._gate.worker_baseline = self._baseline(counts)
            if result.ok and dep.smoke is not None:
                result = await smoke(dep.base_url, dep.served_model_name, dep.smoke, client=self._client)
            if result.ok and self._required_running() and self._gate.pass_(generation):
                self._recompute(reason="model ready and smoke request answered")
                continue
            if not self._gate.gave_up_waiting and time.monotonic() > deadline:
                self._gate.gave_up_waiting = True
                log.error(
                    "deployment not ready in time; still trying",
                    deployment=dep.name,
                    timeout_s=dep.ready_timeout_s,
                    last_error=result.error,
                )
                self._recompute(reason=f"not ready after {dep.ready_timeout_s:g} s")
            with anyio.move_on_after(FAST_PROBE_S):
                await self._changed.wait()

    def _baseline(self, counts: dict[str, int]) -> dict[str, int]:
        """The most workers per type the frontend may count: what it counted at a passing gate, and
        at least this node's planned replicas (with min_ready the first gate may pass before every
        replica registered; a count above this bound is a dead worker's stale registration)."""
        bound = dict(self._gate.worker_baseline or {})
        for spec in self.plan.processes:
            kind = spec.role.frontend_type
            if kind is not None:
                bound[kind] = bound.get(kind, 0)
        for kind in bound:
            planned = sum(1 for s in self.plan.processes if s.role.frontend_type == kind)
            bound[kind] = max(bound[kind], planned)
        for kind, n in counts.items():
            bound[kind] = max(bound.get(kind, 0), n)
        return bound

    async def _stop_all(self) -> None:
        """Stop every process after everything that depends on it; nothing restarts meanwhile.

        Processes with no dependency between them stop at the same time (as systemd and
        process-compose do): a shutdown takes as long as its slowest chain, not the sum of every
        process's stop time. A chain (prefill -> decode -> frontend) still stops one by one.
        """
        if self._deployment is not D.FAILED:
            self._recompute(reason="shutdown")
        self._set_deployment(D.STOPPING, "shutdown")
        slots = list(self._slots.values())
        for slot in slots:
            if slot.scope is not None:
                slot.scope.cancel()
        for slot in slots:
            if slot.finished is not None:
                await slot.finished.wait()
        stopped = {slot.spec.name: anyio.Event() for slot in slots}

        async def stop_after_dependents(slot: _Slot) -> None:
            try:
                for other in slots:
                    if any(dep.name in (slot.spec.name, slot.spec.group) for dep in other.spec.depends_on):
                        await stopped[other.spec.name].wait()
                async with slot.ops:  # after any stop in progress; no start gets in (shutdown is set)
                    await self._stop_child(slot, "shutdown")
            finally:
                stopped[slot.spec.name].set()

        async with anyio.create_task_group() as tg:
            for slot in reversed(slots):  # reverse start order among the ones free to stop together
                tg.start_soon(stop_after_dependents, slot)
        self._set_deployment(D.STOPPED, "every process stopped")
