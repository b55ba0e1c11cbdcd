"""One task per process: wait for dependencies, spawn, probe, see the exit, decide the restart, stop.

The middle layer of the runner (:mod:`supervisor.engine.core` below it, :mod:`supervisor.engine.runner`
above): everything here runs inside one process's lifecycle task or its stop.
"""

from __future__ import annotations

import shutil
import time

import anyio
import anyio.abc

from supervisor.engine import discovery
from supervisor.engine.core import (
    GPU_CLEAR_TIMEOUT_S,
    P,
    RunnerCore,
    _Slot,
)
from supervisor.engine.probes import watch_health
from supervisor.engine.process import Child, spawn
from supervisor.engine.proctree import task_state
from supervisor.engine.states import (
    ProbeResult,
    RestartAction,
    decide_restart,
    failed_retry_delay,
    next_attempt,
)
from supervisor.errors import StartError
from supervisor.eventlog import log
from supervisor.host import nvml as gpu
from supervisor.plan.policies import startup_budget_s
from supervisor.plan.spec import ProcessSpec


class Lifecycles(RunnerCore):
    """The per-process lifecycle tasks of a runner."""

    async def restart(self, name: str) -> None:
        """A control operation (serialized per process): defined by :class:`~supervisor.engine.runner.Runner`."""
        raise NotImplementedError

    def _launch(self, slot: _Slot) -> None:
        slot.finished = anyio.Event()
        slot.scope = anyio.CancelScope()
        self._tg.start_soon(self._supervise, slot)

    async def _supervise(self, slot: _Slot) -> None:
        assert slot.scope is not None and slot.finished is not None
        try:
            with slot.scope:
                await self._lifecycle(slot)
        except Exception as exc:  # a bug of ours costs this process, never the whole supervisor
            log.exception("lifecycle failed", process=slot.spec.name)
            if slot.child is not None:
                slot.child.kill_now()
            self._set(slot, P.FAILED, f"internal error: {exc}")
        finally:
            slot.finished.set()

    async def _end_lifecycle(self, slot: _Slot) -> None:
        if slot.scope is not None and slot.finished is not None:
            slot.scope.cancel()
            await slot.finished.wait()

    async def _lifecycle(self, slot: _Slot) -> None:
        while True:
            # Re-read every round: a reload may have swapped in a new spec for the next start (a
            # rolling reload restarts the running child through its kick).
            spec, policy = slot.spec, slot.spec.restart
            if not self._deps_met(spec):
                self._set(
                    slot,
                    P.WAITING,
                    "waiting for " + ", ".join(f"{d.name} {d.condition.value}" for d in spec.depends_on),
                )
                await self._until(lambda: self._deps_met(slot.spec))
            held = self._gpu_hold(spec)
            if held is not None:
                self._set(slot, P.WAITING, held)
                await self._until(lambda: self._gpu_hold(slot.spec) is None)
                continue  # its dependencies may have changed meanwhile
            await self._gpu_clear(slot)
            slot.kick = anyio.Event()
            try:
                child = spawn(spec, guardian=self._guardian)
            except StartError as exc:
                if exc.transient and await self._retry_spawn(slot, exc.problem):
                    continue
                self._set(slot, P.FAILED, exc.problem)
                return
            slot.child = child
            slot.starts.append(child.started_at)
            self._tg.start_soon(child.watch, slot.output)
            self._set(slot, P.STARTING, f"spawned pid {child.pid}")
            why, killed, kicked = await self._run_child(slot, child)
            if killed:
                self._set(slot, P.STOPPING, why)
                child.snapshot_tree()
            exit_info = await child.stop()
            why += self._report_unkillable(slot, child)
            slot.last_exit = exit_info
            self._forget_registration(slot)
            healthy_for = time.monotonic() - slot.healthy_since if slot.healthy_since else None
            slot.healthy_since = None
            if healthy_for is not None and healthy_for >= policy.reset_after_s:
                slot.failed_retries = 0
            if kicked:
                # An operator's restart (or a rolling reload) is planned, not a crash: like `start`, it
                # begins a fresh crash-loop history, or a few restarts plus one crash would fail it.
                slot.restarts += 1
                slot.forget_crashes()
                self._set(slot, P.WAITING, why)
                continue
            slot.attempt = next_attempt(policy, slot.attempt, healthy_for)
            decision = decide_restart(
                policy,
                failed=killed or not exit_info.clean,
                why=why,
                starts=slot.starts,
                now=time.monotonic(),
                attempt=slot.attempt,
                rand=self._rand(),
            )
            if decision.action is RestartAction.DONE:
                self._set(slot, P.EXITED, decision.reason)
                return
            if decision.action is RestartAction.FAIL:
                retry_s = failed_retry_delay(policy, slot.failed_retries) if decision.crash_loop else 0.0
                if not retry_s:
                    self._set(slot, P.FAILED, decision.reason)
                    return
                # Contained: this replica waits minutes while its siblings serve (the deployment is
                # DEGRADED, or FAILED if it was the last of a required group and the policy says so).
                self._set(slot, P.FAILED, f"{decision.reason}; retrying in {retry_s:g} s")
                await anyio.sleep(retry_s)
                slot.failed_retries += 1
                slot.forget_crashes()
                continue
            self._set(slot, P.BACKOFF, decision.reason)
            if policy.restart_dependents and not slot.rolling_dependents:
                slot.rolling_dependents = True
                self._tg.start_soon(self._restart_dependents, slot)
            slot.attempt += 1
            slot.restarts += 1
            if decision.delay_s > 0:
                await anyio.sleep(decision.delay_s)

    async def _retry_spawn(self, slot: _Slot, problem: str) -> bool:
        """A spawn the host had no resources for counts as a failed start: back off, then True;
        False when the crash-loop limit says to give up."""
        slot.starts.append(time.monotonic())
        decision = decide_restart(
            slot.spec.restart,
            failed=True,
            why=f"could not start: {problem}",
            starts=slot.starts,
            now=time.monotonic(),
            attempt=slot.attempt,
            rand=self._rand(),
        )
        if decision.action is not RestartAction.RESTART:
            return False
        self._set(slot, P.BACKOFF, decision.reason)
        slot.attempt += 1
        await anyio.sleep(decision.delay_s)
        return True

    async def _restart_dependents(self, server: _Slot) -> None:
        """Once ``server`` is healthy again after a restart, restart its dependents one at a time, each
        after the previous is healthy again (or its startup budget ran out).

        For clients that never reconnect (LMCache's lm:// connector keeps its dead socket): meanwhile
        they keep serving without the cache, instead of all going down at once with the server."""
        name = server.spec.name
        done = (P.FAILED, P.STOPPED, P.EXITED)
        try:
            await self._until(
                lambda: server.state is P.RUNNING or server.state in done or self._shutdown.is_set()
            )
            for dependent in self.plan.dependents(name):
                slot = self._slots.get(dependent.name)
                if self._shutdown.is_set() or server.state is not P.RUNNING:
                    return
                if (
                    slot is None
                    or slot.child is None
                    or slot.state not in (P.STARTING, P.RUNNING, P.NOT_READY)
                ):
                    continue
                old = slot.child.pid
                log.info("restarting a dependent", process=dependent.name, pid=old, after=name)
                await self.restart(dependent.name)

                def back(slot: _Slot = slot, old: int = old) -> bool:
                    renewed = slot.state is P.RUNNING and slot.child is not None and slot.child.pid != old
                    return renewed or slot.state in done or self._shutdown.is_set()

                with anyio.move_on_after(startup_budget_s(dependent) or 60.0):
                    await self._until(back)
        finally:
            server.rolling_dependents = False

    async def _run_child(self, slot: _Slot, child: Child) -> tuple[str, bool, bool]:
        """Until the child exits, fails liveness/startup, or is kicked: ``(why, killed, kicked)``."""
        outcome: list[tuple[str, bool, bool]] = []
        async with anyio.create_task_group() as tg:

            def finish(result: tuple[str, bool, bool]) -> None:
                if not outcome:
                    outcome.append(result)
                tg.cancel_scope.cancel()

            async def exited() -> None:
                info = await child.wait()
                finish((f"pid {info.pid} {info.describe()}", False, False))

            async def probed() -> None:
                finish((await self._probe(slot, child), True, False))

            async def kicked() -> None:
                assert slot.kick is not None
                await slot.kick.wait()
                finish(("restart requested", True, True))

            for task in (exited, probed, kicked):
                tg.start_soon(task)
        return outcome[0]

    async def _probe(self, slot: _Slot, child: Child) -> str:
        """Run the probes of one incarnation; returns only with a reason to kill it."""

        def record(result: ProbeResult) -> None:
            slot.last_probe = result

        def started() -> None:
            child.snapshot_tree()  # vLLM's engine processes exist by now (GPU hygiene needs them)
            if slot.spec.probes.readiness is None:
                self._set(slot, P.RUNNING, "started")

        def readiness(ready: bool, why: str) -> None:
            if ready and slot.state is not P.RUNNING:
                self._set(slot, P.RUNNING, why)
            elif not ready and slot.state is P.RUNNING:
                self._set(slot, P.NOT_READY, why)

        return await watch_health(
            slot.spec.probes,
            pid=child.pid,
            started_at=child.started_at,
            client=self._client,
            record=record,
            started=started,
            readiness=readiness,
        )

    def _forget_registration(self, slot: _Slot) -> None:
        """A worker that died without deregistering is removed from file discovery right away."""
        discovery_dir, port = self.plan.deployment.discovery_dir, slot.spec.ports.get("system")
        if discovery_dir and port and slot.spec.role.is_worker:
            removed = discovery.forget_worker(discovery_dir, port)
            if removed:
                log.info("removed stale discovery entries", process=slot.spec.name, entries=len(removed))

    def _gpu_hold(self, spec: ProcessSpec) -> str | None:
        """Why ``spec`` must not start now: one of its GPUs is quarantined (None: it may start)."""
        bad = [g for g in self._gpus if g.quarantine is not None and g.index in spec.gpus]
        if not bad:
            return None
        return "; ".join(f"GPU {g.index} quarantined ({g.quarantine})" for g in bad) + (
            "; no spare GPU: waiting for `lmcache-supervise gpus clear` after a reset"
        )

    async def _gpu_clear(self, slot: _Slot) -> None:
        """Before relaunching a GPU worker, wait until its previous incarnation let go of the GPUs."""
        dead = slot.child
        if slot.spec.gpus and dead is not None:
            left = await gpu.wait_released(
                slot.spec.gpus, dead.descendants, gpu_pids=self._gpu_pids, timeout_s=GPU_CLEAR_TIMEOUT_S
            )
            if left:
                log.warning(
                    "GPU memory still held; starting anyway",
                    process=slot.spec.name,
                    gpus=list(slot.spec.gpus),
                    pids=sorted(left),
                )

    async def _stop_child(self, slot: _Slot, reason: str) -> None:
        child = slot.child
        if child is not None and slot.state.is_live:
            self._set(slot, P.STOPPING, reason)
            slot.last_exit = await child.stop()
            reason += self._report_unkillable(slot, child)
        if slot.state in (P.STOPPING, P.WAITING, P.BACKOFF):
            self._set(slot, P.STOPPED, reason)
        if slot.spec.multiproc_dir and not (child is not None and child.unkillable):
            shutil.rmtree(slot.spec.multiproc_dir, ignore_errors=True)

    def _report_unkillable(self, slot: _Slot, child: Child) -> str:
        """Say so when a stop ran out its bound with processes left: an error event, a line in the
        process's own log (``logs``/``status`` turn it into an ``unkillable`` hint), and a reason
        suffix. Supervision goes on; the guardian keeps their groups registered."""
        if not child.unkillable:
            return ""
        states = ", ".join(f"pid {pid} {task_state(pid) or 'gone'}" for pid in child.unkillable)
        text = f"survived SIGKILL: {states}; left to the guardian"
        log.error("process unkillable", process=slot.spec.name, pids=list(child.unkillable), states=states)
        slot.output(f"lmcache-supervise: {slot.spec.name} {text}\n".encode())
        return f"; {text}"
