"""The deployment's lifecycle as pure code: the gate's generations and the state decision."""

from __future__ import annotations

import itertools

import pytest

from supervisor.engine.gate import GATE_TRANSITIONS, DeploymentFacts, Gate, GateState, decide_deployment
from supervisor.engine.states import DEPLOYMENT_TRANSITIONS, DeploymentState

D = DeploymentState


def facts(**changes: object) -> DeploymentFacts:
    base = dict(gate_open=False, gave_up_waiting=False, failed_group=None, serving=True, any_failed=False)
    return DeploymentFacts(**{**base, **changes})  # type: ignore[arg-type]


def test_a_check_begun_before_a_drop_cannot_open_the_gate() -> None:
    gate = Gate()
    began = gate.generation
    gate.close()  # a required group dropped below min_ready while the check ran
    assert not gate.pass_(began) and not gate.open
    assert gate.pass_(gate.generation) and gate.open
    gate.close()
    assert gate.state is GateState.CLOSED


def test_gate_states_form_a_cycle() -> None:
    assert GATE_TRANSITIONS == {GateState.CLOSED: {GateState.OPEN}, GateState.OPEN: {GateState.CLOSED}}


@pytest.mark.parametrize(
    ("current", "changes", "expected"),
    [
        (D.STARTING, {}, None),  # not ready yet: stays STARTING
        (D.STARTING, {"gate_open": True}, D.READY),
        (D.STARTING, {"gave_up_waiting": True}, D.DEGRADED),  # still trying, but says so
        (D.READY, {}, D.DEGRADED),  # the gate closed: a required group dropped
        (D.READY, {"gate_open": True, "serving": False}, D.DEGRADED),  # one replica of two down
        (D.READY, {"gate_open": True, "any_failed": True}, D.DEGRADED),  # a replica in its long retry
        (D.DEGRADED, {"gate_open": True}, D.READY),
        (D.READY, {"failed_group": "prefill"}, D.FAILED),
        (D.STARTING, {"failed_group": "decode", "gate_open": True}, D.FAILED),
        (D.FAILED, {"gate_open": True}, None),  # terminal until the shutdown it started
        (D.STOPPING, {"gate_open": True}, None),
    ],
)
def test_decide_deployment(current: DeploymentState, changes: dict, expected: DeploymentState | None) -> None:
    assert decide_deployment(current, facts(**changes)) is expected


def test_every_decision_is_a_legal_transition() -> None:
    """Whatever the facts, the decision is allowed by the deployment's transition table."""
    for current, gate_open, gave_up, failed, serving, any_failed in itertools.product(
        D, *[(False, True)] * 2, (None, "decode"), *[(False, True)] * 2
    ):
        new = decide_deployment(
            current,
            facts(
                gate_open=gate_open,
                gave_up_waiting=gave_up,
                failed_group=failed,
                serving=serving,
                any_failed=any_failed,
            ),
        )
        assert new is None or new is current or new in DEPLOYMENT_TRANSITIONS[current], (current, new)
