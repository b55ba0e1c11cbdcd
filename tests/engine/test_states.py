"""The lifecycle tables and the restart arithmetic (pure)."""

from __future__ import annotations

import pytest

from supervisor.engine.states import (
    DEPLOYMENT_TRANSITIONS,
    PROCESS_TRANSITIONS,
    DeploymentState,
    ExitInfo,
    ProcessState,
    RestartAction,
    backoff_delay,
    check_deployment_transition,
    check_process_transition,
    decide_restart,
    next_attempt,
)
from supervisor.errors import StateError
from supervisor.plan.spec import RestartMode, RestartPolicy


def test_every_state_has_a_row() -> None:
    assert set(PROCESS_TRANSITIONS) == set(ProcessState)
    assert set(DEPLOYMENT_TRANSITIONS) == set(DeploymentState)


def test_illegal_transition_names_process_state_and_allowed() -> None:
    with pytest.raises(StateError) as info:
        check_process_transition("decode", ProcessState.STOPPED, ProcessState.RUNNING)
    err = info.value
    assert (err.process, err.current, err.target) == ("decode", "stopped", "running")
    assert set(err.allowed) == {"waiting", "starting", "backoff", "failed"}
    assert "decode" in str(err) and "stopped" in str(err) and "waiting" in str(err)


def test_legal_and_same_state_transitions_pass() -> None:
    check_process_transition("x", ProcessState.STARTING, ProcessState.RUNNING)
    check_process_transition("x", ProcessState.RUNNING, ProcessState.RUNNING)
    check_deployment_transition("d", DeploymentState.DEGRADED, DeploymentState.READY)
    with pytest.raises(StateError):
        check_deployment_transition("d", DeploymentState.STOPPED, DeploymentState.READY)


def test_backoff_grows_by_factor_and_caps() -> None:
    policy = RestartPolicy(backoff_initial_s=0.5, backoff_factor=2.0, backoff_max_s=3.0, jitter=0.0)
    assert [backoff_delay(policy, n, 0.5) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_jitter_stays_within_its_fraction() -> None:
    policy = RestartPolicy(backoff_initial_s=1.0, backoff_factor=2.0, backoff_max_s=100, jitter=0.1)
    assert backoff_delay(policy, 0, 0.0) == pytest.approx(0.9)
    assert backoff_delay(policy, 0, 0.999999) == pytest.approx(1.1, rel=1e-4)
    assert backoff_delay(RestartPolicy(backoff_initial_s=0.0), 7, 0.3) == 0.0


def test_attempt_resets_after_healthy_long_enough() -> None:
    policy = RestartPolicy(reset_after_s=60)
    assert next_attempt(policy, 4, 59.0) == 4
    assert next_attempt(policy, 4, 60.0) == 0
    assert next_attempt(policy, 4, None) == 4


def _decide(policy: RestartPolicy, *, failed: bool, starts: list[float], now: float = 100.0) -> RestartAction:
    return decide_restart(policy, failed=failed, why="x", starts=starts, now=now, attempt=0, rand=0.5).action


def test_modes() -> None:
    assert _decide(RestartPolicy(mode=RestartMode.ALWAYS), failed=False, starts=[99]) is RestartAction.RESTART
    assert (
        _decide(RestartPolicy(mode=RestartMode.ON_FAILURE), failed=False, starts=[99]) is RestartAction.DONE
    )
    assert (
        _decide(RestartPolicy(mode=RestartMode.ON_FAILURE), failed=True, starts=[99]) is RestartAction.RESTART
    )
    assert _decide(RestartPolicy(mode=RestartMode.NEVER), failed=True, starts=[99]) is RestartAction.FAIL
    assert _decide(RestartPolicy(mode=RestartMode.NEVER), failed=False, starts=[99]) is RestartAction.DONE


def test_crash_loop_counts_only_starts_inside_the_window() -> None:
    policy = RestartPolicy(limit_starts=3, limit_window_s=10.0)
    assert _decide(policy, failed=True, starts=[95, 99]) is RestartAction.RESTART
    assert _decide(policy, failed=True, starts=[91, 95, 99]) is RestartAction.FAIL
    assert _decide(policy, failed=True, starts=[80, 95, 99]) is RestartAction.RESTART
    decision = decide_restart(
        policy, failed=True, why="pid 7 exit code 1", starts=[91, 95, 99], now=100, attempt=0, rand=0.5
    )
    assert "crash loop" in decision.reason and "pid 7" in decision.reason


def test_exit_info_describes_codes_and_signals() -> None:
    assert ExitInfo.from_popen_code(5, -9, runtime_s=1.0).describe() == "killed by SIGKILL"
    info = ExitInfo.from_popen_code(5, 3, runtime_s=1.0)
    assert info.describe() == "exit code 3" and not info.clean
    assert ExitInfo.from_popen_code(5, 0, runtime_s=1.0).clean
