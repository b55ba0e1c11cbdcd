"""Lifecycles, their legal transitions, and the restart arithmetic: pure, no IO, no clock.

A process moves through :class:`ProcessState`; the deployment as a whole through
:class:`DeploymentState`. Every change goes through :func:`check_process_transition` /
:func:`check_deployment_transition`, which raise :class:`~supervisor.errors.StateError` naming the
process, its state and the states it may go to. What to do after an exit is decided by
:func:`decide_restart` from the policy, the exit and the start history; the caller supplies the
time and the random number, so the same inputs always give the same decision.

The snapshot and event dataclasses at the end are the runner's public vocabulary: the control
socket, metrics and sd_notify read them and never reach into the runner.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from supervisor.errors import StateError
from supervisor.host.gpuhealth import GpuCounters, GpuFault
from supervisor.plan.spec import RestartMode, RestartPolicy


class ProcessState(enum.Enum):
    """Where one supervised process is in its life."""

    STOPPED = "stopped"  # not running: never started, or stopped on request
    WAITING = "waiting"  # waiting for its dependencies
    STARTING = "starting"  # spawned; startup (and first readiness) not yet passed
    RUNNING = "running"  # started and ready: counts as healthy for dependents
    NOT_READY = "not-ready"  # started, but its readiness probe fails: degraded, not killed
    STOPPING = "stopping"  # its group is being signalled
    BACKOFF = "backoff"  # exited unexpectedly; a restart is scheduled
    EXITED = "exited"  # exited and its policy says not to restart
    FAILED = "failed"  # crash loop, unspawnable, or a failure with restarts off

    @property
    def summary(self) -> str:
        """The word ``status`` shows: what an operator asks (is it healthy?), where the state itself is
        the runner's exact phase (waiting and starting are both "starting"; exited is "stopped")."""
        return _SUMMARY[self]

    @property
    def is_live(self) -> bool:
        """A child process exists (or is being stopped) in this state."""
        return self in (
            ProcessState.STARTING,
            ProcessState.RUNNING,
            ProcessState.NOT_READY,
            ProcessState.STOPPING,
        )


_SUMMARY = {
    ProcessState.STOPPED: "stopped",
    ProcessState.WAITING: "starting",
    ProcessState.STARTING: "starting",
    ProcessState.RUNNING: "healthy",
    ProcessState.NOT_READY: "unhealthy",
    ProcessState.STOPPING: "stopping",
    ProcessState.BACKOFF: "backoff",
    ProcessState.EXITED: "stopped",
    ProcessState.FAILED: "failed",
}


_P = ProcessState
PROCESS_TRANSITIONS: Mapping[ProcessState, frozenset[ProcessState]] = {
    # STOPPED/EXITED -> FAILED: the spawn itself failed (no interpreter, no metrics directory) for a
    # process that had no dependencies to wait for, so it never got as far as WAITING or STARTING.
    # Any state a spawn is tried from -> BACKOFF: the host was out of descriptors, memory or
    # processes (EMFILE, ENOMEM, EAGAIN); the start is retried like a crash.
    _P.STOPPED: frozenset({_P.WAITING, _P.STARTING, _P.BACKOFF, _P.FAILED}),
    _P.WAITING: frozenset({_P.STARTING, _P.STOPPED, _P.BACKOFF, _P.FAILED}),
    _P.STARTING: frozenset({_P.RUNNING, _P.NOT_READY, _P.STOPPING, _P.BACKOFF, _P.EXITED, _P.FAILED}),
    _P.RUNNING: frozenset({_P.NOT_READY, _P.STOPPING, _P.BACKOFF, _P.EXITED, _P.FAILED}),
    _P.NOT_READY: frozenset({_P.RUNNING, _P.STOPPING, _P.BACKOFF, _P.EXITED, _P.FAILED}),
    # STOPPING ends in STOPPED (on request), BACKOFF (liveness/startup kill), WAITING (a dependency
    # restarted and takes its dependents along) or FAILED (crash loop detected on that path).
    _P.STOPPING: frozenset({_P.STOPPED, _P.BACKOFF, _P.WAITING, _P.EXITED, _P.FAILED}),
    _P.BACKOFF: frozenset({_P.WAITING, _P.STARTING, _P.STOPPED, _P.FAILED}),
    _P.EXITED: frozenset({_P.WAITING, _P.STARTING, _P.STOPPED, _P.BACKOFF, _P.FAILED}),
    _P.FAILED: frozenset({_P.WAITING, _P.STARTING, _P.STOPPED, _P.BACKOFF}),
}


class DeploymentState(enum.Enum):
    """The deployment as its users see it."""

    STARTING = "starting"  # not yet ready for the first time
    READY = "ready"  # every process healthy, the model answers, the smoke request passed
    DEGRADED = "degraded"  # was ready (or gave up waiting); some process is not healthy
    FAILED = "failed"  # a required process failed for good; shutdown follows
    STOPPING = "stopping"
    STOPPED = "stopped"


_D = DeploymentState
DEPLOYMENT_TRANSITIONS: Mapping[DeploymentState, frozenset[DeploymentState]] = {
    _D.STARTING: frozenset({_D.READY, _D.DEGRADED, _D.FAILED, _D.STOPPING}),
    _D.READY: frozenset({_D.DEGRADED, _D.FAILED, _D.STOPPING}),
    _D.DEGRADED: frozenset({_D.READY, _D.FAILED, _D.STOPPING}),
    _D.FAILED: frozenset({_D.STOPPING}),
    _D.STOPPING: frozenset({_D.STOPPED}),
    _D.STOPPED: frozenset(),
}


def check_process_transition(name: str, current: ProcessState, target: ProcessState) -> None:
    """Raise :class:`StateError` unless ``current -> target`` is in the table (same state is a no-op)."""
    allowed = PROCESS_TRANSITIONS[current]
    if target is not current and target not in allowed:
        raise StateError(name, current.value, target.value, sorted(s.value for s in allowed))


def check_deployment_transition(name: str, current: DeploymentState, target: DeploymentState) -> None:
    """Raise :class:`StateError` unless the deployment may go from ``current`` to ``target``."""
    allowed = DEPLOYMENT_TRANSITIONS[current]
    if target is not current and target not in allowed:
        raise StateError(name, current.value, target.value, sorted(s.value for s in allowed))


@dataclass(frozen=True)
class ExitInfo:
    """How a child ended: ``returncode`` for a normal exit, ``signal`` when a signal killed it."""

    pid: int
    returncode: int | None
    signal: int | None
    runtime_s: float
    survived_kill: bool = False  # still there after SIGKILL and the wait: see Child.unkillable

    @classmethod
    def from_popen_code(cls, pid: int, code: int, *, runtime_s: float) -> ExitInfo:
        """Popen reports death by signal N as ``-N``."""
        if code < 0:
            return cls(pid=pid, returncode=None, signal=-code, runtime_s=runtime_s)
        return cls(pid=pid, returncode=code, signal=None, runtime_s=runtime_s)

    @property
    def clean(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        if self.survived_kill:
            return "survived SIGKILL (uninterruptible)"
        if self.signal is not None:
            try:
                return f"killed by {signal.Signals(self.signal).name}"
            except ValueError:
                return f"killed by signal {self.signal}"
        return f"exit code {self.returncode}"


class RestartAction(enum.Enum):
    RESTART = "restart"  # start again after ``delay_s``
    DONE = "done"  # leave it exited: the policy does not restart this exit
    FAIL = "fail"  # give up: crash loop, or a failure with restarts off


@dataclass(frozen=True)
class RestartDecision:
    action: RestartAction
    delay_s: float
    reason: str
    crash_loop: bool = False  # FAIL because of the start limit (retried later), not the policy


def failed_retry_delay(policy: RestartPolicy, retries: int) -> float:
    """How long a replica FAILED by a crash loop waits before one more start (0: never again).

    Long on purpose (minutes): the replica's siblings serve meanwhile, and a model that cannot load
    should not burn a GPU in a tight loop; doubling per failed retry, capped.
    """
    if policy.failed_retry_s <= 0:
        return 0.0
    return float(min(policy.failed_retry_max_s, policy.failed_retry_s * 2 ** max(retries, 0)))


def backoff_delay(policy: RestartPolicy, attempt: int, rand: float) -> float:
    """Exponential backoff for the ``attempt``-th consecutive restart (0-based), with jitter.

    ``rand`` in [0, 1) spreads the delay by +-``policy.jitter`` (a fraction) so that processes
    crashing together do not restart in lockstep; the cap applies after the jitter.
    """
    if policy.backoff_initial_s <= 0:
        return 0.0
    base = policy.backoff_initial_s * policy.backoff_factor ** max(attempt, 0)
    spread = 1.0 + policy.jitter * (2.0 * rand - 1.0)
    return max(0.0, min(policy.backoff_max_s, base * spread))


def next_attempt(policy: RestartPolicy, attempt: int, healthy_for_s: float | None) -> int:
    """The backoff attempt counter after an exit: reset once the process stayed healthy long enough."""
    if healthy_for_s is not None and healthy_for_s >= policy.reset_after_s:
        return 0
    return attempt


def decide_restart(
    policy: RestartPolicy,
    *,
    failed: bool,
    why: str,
    starts: Sequence[float],
    now: float,
    attempt: int,
    rand: float,
) -> RestartDecision:
    """What to do after a process ended.

    ``failed`` is true for a non-zero exit, a signal, or a kill by the supervisor (liveness,
    startup budget); ``starts`` are the monotonic times of its recent starts, this one included.
    The crash-loop limit counts starts inside ``limit_window_s``: with ``limit_starts`` of them
    already spent, the process is FAILED instead of started again.
    """
    if policy.mode is RestartMode.NEVER or (policy.mode is RestartMode.ON_FAILURE and not failed):
        action = RestartAction.FAIL if failed else RestartAction.DONE
        return RestartDecision(action, 0.0, f"{why}; restart policy is {policy.mode.value}")
    recent = [t for t in starts if now - t <= policy.limit_window_s]
    if policy.limit_starts > 0 and len(recent) >= policy.limit_starts:
        return RestartDecision(
            RestartAction.FAIL,
            0.0,
            f"{why}; started {len(recent)} times within {policy.limit_window_s:g} s (crash loop)",
            crash_loop=True,
        )
    delay = backoff_delay(policy, attempt, rand)
    return RestartDecision(RestartAction.RESTART, delay, f"{why}; restarting in {delay:.3g} s")


# ---- the runner's public vocabulary -------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """One probe run: success, how long it took, and why it failed."""

    ok: bool
    latency_s: float
    error: str | None = None


@dataclass(frozen=True)
class ProcessStatus:
    """A snapshot of one supervised process (times are monotonic except ``started_wall``)."""

    name: str
    role: str
    state: ProcessState
    required: bool
    pid: int | None
    started_wall: float | None
    uptime_s: float | None
    restarts: int
    last_exit: ExitInfo | None
    last_probe: ProbeResult | None
    reason: str
    group: str = ""  # the replica group (the profile's worker table); the name itself when alone


@dataclass(frozen=True)
class GpuUser:
    """A process holding memory on a GPU; ``process`` names the supervised process it belongs to."""

    pid: int
    used_bytes: int | None
    process: str | None


@dataclass(frozen=True)
class GpuStatus:
    """One watched GPU as the GPU guard sees it (see :mod:`supervisor.engine.gpuguard`).

    ``quarantine`` is the reason a fatal fault took it out of service (None: healthy); ``spare``
    is true for a GPU the profile lists as a spare. ``counters`` is the latest health reading and
    ``faults`` counts faults by class (fatal, app, info) since supervision started.
    """

    index: int
    uuid: str
    name: str
    total_bytes: int | None
    spare: bool
    quarantine: str | None
    last_fault: GpuFault | None
    faults: Mapping[str, int]
    counters: GpuCounters | None
    users: tuple[GpuUser, ...] = ()
    assigned_to: tuple[str, ...] = ()  # supervised processes whose GPUs include this one

    @property
    def healthy(self) -> bool:
        return self.quarantine is None


@dataclass(frozen=True)
class DeploymentStatus:
    """A snapshot of the whole deployment, safe to hand to other tasks or serialise."""

    name: str
    state: DeploymentState
    base_url: str
    model: str
    ready_since_wall: float | None
    processes: tuple[ProcessStatus, ...]
    gpus: tuple[GpuStatus, ...] = ()  # empty when no GPU is watched (no GPU in the plan, no NVML)

    def process(self, name: str) -> ProcessStatus:
        for proc in self.processes:
            if proc.name == name:
                return proc
        raise KeyError(name)


@dataclass(frozen=True)
class ProcessEvent:
    """A process changed state (observers get it synchronously, in order)."""

    name: str
    old: ProcessState
    new: ProcessState
    pid: int | None
    reason: str
    at: float


@dataclass(frozen=True)
class DeploymentEvent:
    """The deployment changed state; ``status`` is the snapshot right after the change."""

    old: DeploymentState
    new: DeploymentState
    reason: str
    at: float
    status: DeploymentStatus


@dataclass(frozen=True)
class GpuEvent:
    """A GPU had a fault, or was quarantined or cleared; ``DeploymentStatus.gpus`` has the view after."""

    gpu: int
    what: str
    quarantined: bool
    at: float


RunnerEvent = ProcessEvent | DeploymentEvent | GpuEvent
