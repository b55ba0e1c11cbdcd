"""The runner's core: its state and the rules that change it, below the per-process lifecycle.

Three layers make the runner, each a class over the one before: :class:`RunnerCore` (this module:
the process slots, every state change through the transition tables, replica groups and the
deployment's state decision), :class:`~supervisor.engine.lifecycle.Lifecycles` (one task per
process: spawn, probe, exit, restart decision, stop) and :class:`~supervisor.engine.runner.Runner`
(the public API, reloads, the deployment gate and the ordered shutdown).
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from supervisor.engine.gate import DeploymentFacts, Gate, decide_deployment
from supervisor.engine.logs import ChildOutput, LogOptions, TerminalEcho
from supervisor.engine.process import Child, Guardian
from supervisor.engine.states import (
    DeploymentEvent,
    DeploymentState,
    DeploymentStatus,
    ExitInfo,
    GpuStatus,
    ProbeResult,
    ProcessEvent,
    ProcessState,
    ProcessStatus,
    RunnerEvent,
    check_deployment_transition,
    check_process_transition,
)
from supervisor.errors import StartError
from supervisor.eventlog import log
from supervisor.host import nvml as gpu
from supervisor.plan.spec import Condition, Plan, ProcessSpec

if TYPE_CHECKING:
    import httpx

P, D = ProcessState, DeploymentState

GPU_CLEAR_TIMEOUT_S = 60.0
LOG_FLUSH_S = 2.0
#: A ``started`` dependency holds once its process was spawned (or ran and exited cleanly).
STARTED_STATES = (ProcessState.STARTING, ProcessState.RUNNING, ProcessState.NOT_READY, ProcessState.EXITED)
Observer = Callable[[RunnerEvent], None]
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

    def forget_crashes(self) -> None:
        """A fresh crash-loop history (an operator's start or restart, a long retry after a loop):
        earlier starts no longer count toward the limit, the backoff starts again from its first step."""
        self.starts.clear()
        self.attempt = 0


def _needs_tls(plan: Plan) -> bool:
    """Whether any probe or the smoke request speaks HTTPS. The plan's own are plain HTTP on loopback;
    without TLS the client skips building an SSL context (certifi's bundle: 30-180 ms of every start)."""
    urls = [plan.deployment.base_url]
    for spec in plan.processes:
        probes = spec.probes
        for probe in (probes.startup, probes.readiness, probes.liveness) if probes is not None else ():
            urls.append(str(getattr(getattr(probe, "check", None), "url", "") or ""))
    return any(url.startswith("https:") for url in urls)


class LazyHttpClient:
    """Stands in for an ``httpx.AsyncClient``, made on its first use: only HTTPS checks and etcd-auth
    need one (plain HTTP goes through ``probe_http``), and importing httpx costs ~50 ms of CPU that
    would otherwise land while the children start."""

    def __init__(self, *, verify: bool) -> None:
        self._verify = verify
        self._real: httpx.AsyncClient | None = None

    def __getattr__(self, name: str) -> Any:
        if self._real is None:
            import httpx

            self._real = httpx.AsyncClient(trust_env=False, verify=self._verify)
        return getattr(self._real, name)

    async def aclose(self) -> None:
        if self._real is not None:
            await self._real.aclose()
            self._real = None


class RunnerCore:
    """Process slots and state changes; see :class:`~supervisor.engine.runner.Runner` for the API."""

    # Set by Runner.serve while it runs (the guardian, the task group).
    _guardian: Guardian
    _tg: anyio.abc.TaskGroup
    _client: httpx.AsyncClient  # a LazyHttpClient: httpx is imported only if a check needs it

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

    def _slot(self, name: str) -> _Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise StartError(name, f"no such process in deployment {self.plan.deployment.name!r}") from None

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
