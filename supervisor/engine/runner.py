"""The supervisor: start a plan in dependency order, watch it, restart what dies, stop it in reverse.

One anyio task per process runs its lifecycle (wait for dependencies -> spawn -> startup probe ->
readiness/liveness -> exit -> restart decision); one more task gates the deployment (model-ready
URL, then a smoke request). Exits are seen through pidfds the moment they happen; probes run fast
(<= 100 ms) only while something is starting. Per-process state is keyed by name so a later
``apply(new_plan)`` can swap specs one process at a time.

The narrow API other features use (control socket, metrics, sd_notify) is: :meth:`Runner.status`,
:meth:`Runner.subscribe` (synchronous observers of :data:`~supervisor.states.RunnerEvent`),
:meth:`Runner.start` / :meth:`Runner.stop` / :meth:`Runner.restart`,
:meth:`Runner.request_shutdown` and :meth:`Runner.wait_until`.
:func:`supervisor.foreground.run` is the blocking entry point with signals and the pid file.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import httpx

from supervisor.engine import discovery
from supervisor.engine.gate import DeploymentFacts, Gate, decide_deployment
from supervisor.engine.logs import ChildOutput, LogOptions, TerminalEcho, flush_all
from supervisor.engine.probes import FAST_PROBE_S, deployment_ready, smoke, watch_health
from supervisor.engine.process import Child, Guardian, spawn
from supervisor.engine.proctree import task_state
from supervisor.engine.states import (
    DeploymentEvent,
    DeploymentState,
    DeploymentStatus,
    ExitInfo,
    GpuEvent,
    GpuStatus,
    ProbeResult,
    ProcessEvent,
    ProcessState,
    ProcessStatus,
    RestartAction,
    RunnerEvent,
    check_deployment_transition,
    check_process_transition,
    decide_restart,
    failed_retry_delay,
    next_attempt,
)
from supervisor.errors import GpuError, StartError
from supervisor.eventlog import log
from supervisor.host import nvml as gpu
from supervisor.plan.policies import startup_budget_s
from supervisor.plan.spec import Condition, Plan, ProcessSpec

P, D = ProcessState, DeploymentState

GPU_CLEAR_TIMEOUT_S = 60.0
LOG_FLUSH_S = 2.0
#: A ``started`` dependency holds once its process was spawned (or ran and exited cleanly).
STARTED_STATES = (ProcessState.STARTING, ProcessState.RUNNING, ProcessState.NOT_READY, ProcessState.EXITED)
Observer = Callable[[RunnerEvent], None]
Service = Callable[["Runner"], Coroutine[Any, Any, None]]
GpuPids = Callable[[tuple[int, ...]], "set[int] | None"]


@dataclass
class _Slot:
    """Mutable bookkeeping for one process, owned by the runner (never handed out)."""

    spec: ProcessSpec
    output: ChildOutput
    state: ProcessState = P.STOPPED
    reason: str = ""
    child: Child | None = None
    scope: anyio.CancelScope | None = None
    finished: anyio.Event | None = None
    kick: anyio.Event | None = None  # set by restart: the live child is stopped and started again
    ops: anyio.Lock = field(default_factory=anyio.Lock)  # one control operation at a time, in order
    starts: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    restarts: int = 0
    attempt: int = 0
    healthy_since: float | None = None
    failed_retries: int = 0  # long retries after a crash loop, reset once healthy reset_after_s
    last_exit: ExitInfo | None = None
    last_probe: ProbeResult | None = None
    rolling_dependents: bool = False  # its dependents are being restarted one at a time


def _needs_tls(plan: Plan) -> bool:
    """Whether any probe or the smoke request speaks HTTPS. The plan's own are plain HTTP on loopback;
    without TLS the client skips building an SSL context (certifi's bundle: 30-180 ms of every start)."""
    urls = [plan.deployment.base_url]
    for spec in plan.processes:
        probes = spec.probes
        for probe in (probes.startup, probes.readiness, probes.liveness) if probes is not None else ():
            urls.append(str(getattr(getattr(probe, "check", None), "url", "") or ""))
    return any(url.startswith("https:") for url in urls)


class Runner:
    """Supervises one :class:`~supervisor.spec.Plan`; run it with :meth:`serve`."""

    def __init__(
        self,
        plan: Plan,
        *,
        log_options: LogOptions = LogOptions(),
        echo: TerminalEcho | None = None,
        gpu_pids: GpuPids = gpu.gpu_pids,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.plan = plan
        self._log_options, self._echo = log_options, echo
        self._slots = {
            spec.name: _Slot(spec, ChildOutput(spec.name, spec.log_file, log_options, echo))
            for spec in plan.processes
        }
        self._observers: list[Observer] = []
        self._gpu_pids, self._rand = gpu_pids, rand
        self._deployment = D.STARTING
        self._ready_since_wall: float | None = None
        self._gate = Gate()
        self._exit_code = 0
        self._started_at = time.monotonic()
        self._changed = anyio.Event()  # replaced on every change: a broadcast "something changed"
        self._shutdown = anyio.Event()
        self._applying = anyio.Lock()
        self._gpus: tuple[GpuStatus, ...] = ()  # the GPU guard's view; a quarantined GPU takes no spawn
        self.gpu_clearer: Callable[[int], Awaitable[str]] | None = None  # set by the GPU guard

    # ---- public API -------------------------------------------------------------------------

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        """Call ``observer(event)`` on every state change, synchronously; it must not block."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    def status(self) -> DeploymentStatus:
        now = time.monotonic()
        procs = []
        for slot in self._slots.values():
            child = slot.child if slot.state.is_live else None
            procs.append(
                ProcessStatus(
                    name=slot.spec.name,
                    role=slot.spec.role.value,
                    state=slot.state,
                    required=slot.spec.required,
                    pid=child.pid if child else None,
                    started_wall=child.started_wall if child else None,
                    uptime_s=now - child.started_at if child else None,
                    restarts=slot.restarts,
                    last_exit=slot.last_exit,
                    last_probe=slot.last_probe,
                    reason=slot.reason,
                    group=slot.spec.group,
                )
            )
        dep = self.plan.deployment
        return DeploymentStatus(
            name=dep.name,
            state=self._deployment,
            base_url=dep.base_url,
            model=dep.served_model_name,
            ready_since_wall=self._ready_since_wall,
            processes=tuple(procs),
            gpus=self._gpus,
        )

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

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    def request_shutdown(self, *, kill: bool = False, reason: str = "requested") -> None:
        """Begin the orderly shutdown; ``kill`` (a second Ctrl-C) SIGKILLs every group at once."""
        if kill:
            log.warning("killing every process group now", reason=reason)
            for slot in self._slots.values():
                if slot.child is not None:
                    slot.child.kill_now()
        elif not self._shutdown.is_set():
            log.info("shutdown requested", reason=reason)
        self._shutdown.set()

    # Control operations on one process are serialized by its ``ops`` lock, in the order they were
    # made (the asyncio lock hands itself on first come, first served), so each runs against the
    # state the previous one left: a restart made during a stop waits for the stop, then starts; a
    # start or restart during a backoff starts now. Once shutting down, start and restart do nothing.

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
        try:
            async with (
                httpx.AsyncClient(trust_env=False, verify=_needs_tls(self.plan)) as client,
                anyio.create_task_group() as tg,
            ):
                self._client, self._tg = client, tg
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
            flush_all(LOG_FLUSH_S)  # the last lines on disk before we return (bounded: a stalled disk)
        return self._exit_code

    # ---- state ------------------------------------------------------------------------------

    def _slot(self, name: str) -> _Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise StartError(name, f"no such process in deployment {self.plan.deployment.name!r}") from None

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
        slot.starts.clear()
        slot.attempt = slot.failed_retries = 0
        # Queued at once, before the lifecycle task runs: whoever waits for the process to come back
        # sees it leave stopped/failed now, never mistakes that state for the answer.
        self._set(slot, P.WAITING, "start requested")
        self._launch(slot)

    def _emit(self, event: RunnerEvent) -> None:
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:  # an observer's bug must not take supervision down
                log.exception("observer failed", observer=repr(observer))
        self._changed.set()
        self._changed = anyio.Event()

    def _set(self, slot: _Slot, new: ProcessState, reason: str) -> None:
        old = slot.state
        check_process_transition(slot.spec.name, old, new)
        if old is new and reason == slot.reason:
            return
        slot.state, slot.reason = new, reason
        pid = slot.child.pid if slot.child is not None else None
        if new is P.RUNNING and slot.healthy_since is None:
            slot.healthy_since = time.monotonic()
        group = slot.spec.group
        if slot.spec.required and old is P.RUNNING and new is not P.RUNNING and not self._group_ok(group):
            # Only a group below min_ready takes the deployment back through the gate: one replica
            # of two restarting leaves the model served (Dynamo migrates its requests).
            self._gate.close()
        level = "error" if new is P.FAILED else "warning" if new in (P.BACKOFF, P.NOT_READY) else "info"
        getattr(log, level)(
            "process " + new.value, process=slot.spec.name, pid=pid, was=old.value, reason=reason
        )
        self._emit(ProcessEvent(slot.spec.name, old, new, pid, reason, time.monotonic()))
        self._recompute(reason=f"{slot.spec.name} {new.value}")

    def _set_deployment(self, new: DeploymentState, reason: str) -> None:
        old = self._deployment
        if old is new:
            return
        check_deployment_transition(self.plan.deployment.name, old, new)
        self._deployment = new
        if new is D.READY:
            self._ready_since_wall = time.time()
        log.log(
            40 if new is D.FAILED else 20,
            "deployment " + new.value,
            deployment=self.plan.deployment.name,
            was=old.value,
            reason=reason,
        )
        self._emit(DeploymentEvent(old, new, reason, time.monotonic(), self.status()))

    def _recompute(self, *, reason: str) -> None:
        # A replica restarting after a crash is transient; a failed one needs someone to look.
        groups = dict.fromkeys(spec.group for spec in self.plan.processes)
        facts = DeploymentFacts(
            gate_open=self._gate.open,
            gave_up_waiting=self._gate.gave_up_waiting,
            failed_group=next((g for g in groups if self._required_group(g) and self._group_down(g)), None),
            serving=all(self._group_ok(g) for g in groups),
            any_failed=any(s.state is P.FAILED for s in self._slots.values()),
        )
        new = decide_deployment(self._deployment, facts)
        if new is D.FAILED:
            group = facts.failed_group or ""
            what = "required process" if len(self._members(group)) == 1 else "every replica of"
            self._exit_code = 1
            self._set_deployment(D.FAILED, f"{what} {group} failed")
            self.request_shutdown(reason="a required process failed")
        elif new is not None:
            self._set_deployment(new, reason)

    # ---- replica groups (a process alone is a group of one) ----------------------------------

    def _members(self, group: str) -> list[_Slot]:
        return [s for s in self._slots.values() if s.spec.group == group]

    def _count(self, group: str, states: tuple[ProcessState, ...]) -> tuple[int, int]:
        """``(members in states, members needed)``: need is min_ready, at most the group's size."""
        members = self._members(group)
        need = min(members[0].spec.min_ready, len(members)) if members else 0
        return sum(1 for s in members if s.state in states), need

    def _group_ok(self, group: str) -> bool:
        healthy, need = self._count(group, (P.RUNNING,))
        return healthy >= need

    def _required_group(self, group: str) -> bool:
        return any(s.spec.required for s in self._members(group))

    def _group_down(self, group: str) -> bool:
        """Every member FAILED (and the deployment's policy is to give up then)."""
        failed, _ = self._count(group, (P.FAILED,))
        return self.plan.deployment.on_role_failed == "exit" and failed == len(self._members(group))

    def _required_running(self) -> bool:
        return all(self._group_ok(s.spec.group) for s in self._slots.values() if s.spec.required)

    def _deps_met(self, spec: ProcessSpec) -> bool:
        for dep in spec.depends_on:
            members = self._members(dep.name)
            states = (P.RUNNING,) if dep.condition is Condition.HEALTHY else STARTED_STATES
            if sum(1 for s in members if s.state in states) < min(dep.min_ready, len(members)):
                return False
        return True

    async def _until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    # ---- one process's lifecycle ----------------------------------------------------------

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
                slot.restarts += 1
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
                slot.starts.clear()
                slot.attempt = 0
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

    # ---- probes -------------------------------------------------------------------------------

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

    # ---- deployment gate and shutdown ------------------------------------------------------

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
