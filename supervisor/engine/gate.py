"""The deployment's own lifecycle: the gate to READY, and the pure decision of its state.

A process has :class:`~supervisor.engine.states.ProcessState` and one transition table; the
deployment has :class:`~supervisor.engine.states.DeploymentState` with its own table, and this:

- :class:`Gate` is what the deployment remembers on its way to READY: whether the model answered
  (the ready URL and a smoke request) since the required processes last came up, in which
  *generation* (bumped whenever a required group drops below ``min_ready``, so a check that began
  before the drop cannot open the gate after it), whether it gave up waiting past
  ``ready_timeout_s``, and how many workers per type the frontend counted the first time.
- :func:`decide_deployment` turns the facts of one moment into the state the deployment should be
  in, like :func:`~supervisor.engine.states.decide_restart` does for a process: pure, tested alone.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from supervisor.engine.states import DeploymentState

D = DeploymentState


class GateState(enum.Enum):
    CLOSED = "closed"  # a required group is below min_ready, or the model has not answered since
    OPEN = "open"  # the model-ready URL and the smoke request passed in the current generation


GATE_TRANSITIONS: Mapping[GateState, frozenset[GateState]] = {
    GateState.CLOSED: frozenset({GateState.OPEN}),
    GateState.OPEN: frozenset({GateState.CLOSED}),
}


@dataclass
class Gate:
    """What the deployment remembers on its way to READY (owned by the runner, never handed out)."""

    state: GateState = GateState.CLOSED
    generation: int = 0
    gave_up_waiting: bool = False
    worker_baseline: dict[str, int] | None = None

    @property
    def open(self) -> bool:
        return self.state is GateState.OPEN

    def close(self) -> None:
        """A required group dropped below min_ready: the model must answer again."""
        self.generation += 1
        self.state = GateState.CLOSED

    def pass_(self, generation: int) -> bool:
        """Open the gate for a check that began in ``generation``; False if a drop came meanwhile."""
        if generation != self.generation:
            return False
        self.state = GateState.OPEN
        return True


@dataclass(frozen=True)
class DeploymentFacts:
    """One moment of the deployment, as :func:`decide_deployment` needs it."""

    gate_open: bool
    gave_up_waiting: bool
    failed_group: str | None  # a required group none of whose members is left (policy: exit)
    serving: bool  # every group has its min_ready healthy members
    any_failed: bool  # some process (a replica, say) gave up for now: someone should look


def decide_deployment(current: DeploymentState, facts: DeploymentFacts) -> DeploymentState | None:
    """The state ``facts`` call for, or None to stay as ``current`` is.

    FAILED once a required group is gone (a shutdown follows). Past the gate: READY while serving
    with nothing failed, else DEGRADED (still serving what it can). Before it: STARTING, unless it
    was READY before (DEGRADED) or gave up waiting for the model (DEGRADED, and still trying).
    """
    if current in (D.FAILED, D.STOPPING, D.STOPPED):
        return None
    if facts.failed_group is not None:
        return D.FAILED
    if facts.gate_open:
        return D.READY if facts.serving and not facts.any_failed else D.DEGRADED
    if current is D.READY or facts.gave_up_waiting:
        return D.DEGRADED
    return None
