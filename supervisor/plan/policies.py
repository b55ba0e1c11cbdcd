"""Policies a plan attaches to each process: probes against a start-up budget, restart rules, budgets.

Pure functions of profile settings; ``render`` and ``infra`` build every process's policies here,
and ``export.systemd`` and ``control.reload`` read the same budgets back from a plan.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from supervisor.plan.spec import Check, Probe, Probes, ProcessSpec, RestartMode, RestartPolicy

if TYPE_CHECKING:  # the types only: a cached plan is used without importing pydantic
    from supervisor.profile.schema import Health
    from supervisor.profile.schema import Restart as RestartSettings

# A real vLLM load takes minutes; the mocker and the frontend are up in well under a second.
STARTUP_BUDGET_S = {"vllm": 900.0, "mocker": 60.0, "frontend": 60.0}
INFRA_STARTUP_BUDGET_S = 30.0  # etcd and nats-server answer health within a second or two


def restart_policy(settings: RestartSettings) -> RestartPolicy:
    return RestartPolicy(
        mode=RestartMode(settings.policy),
        backoff_initial_s=settings.backoff_initial_s,
        backoff_factor=settings.backoff_factor,
        backoff_max_s=settings.backoff_max_s,
        jitter=settings.jitter,
        reset_after_s=settings.reset_after_s,
        limit_starts=settings.limit_starts,
        limit_window_s=settings.limit_window_s,
        restart_dependents=settings.restart_dependents,
        failed_retry_s=settings.failed_retry_s,
        failed_retry_max_s=settings.failed_retry_max_s,
    )


def probes(health: Health, ready: Check, live: Check, budget_s: float) -> Probes:
    """Startup probes fast against a load budget, then readiness and liveness at the normal period."""
    budget = health.startup_timeout_s or budget_s
    startup = Probe(
        check=ready,
        period_s=health.startup_period_s,
        timeout_s=min(health.timeout_s, max(health.startup_period_s * 5, 0.5)),
        failure_threshold=max(1, math.ceil(budget / health.startup_period_s)),
    )

    def normal(check: Check) -> Probe:
        return Probe(
            check=check,
            period_s=health.period_s,
            timeout_s=health.timeout_s,
            failure_threshold=health.failure_threshold,
        )

    return Probes(
        startup=startup, readiness=normal(ready), liveness=normal(live) if health.liveness else None
    )


def startup_budget_s(spec: ProcessSpec) -> float:
    """How long one process may take to pass its startup probe before the runner gives up on it."""
    probe = spec.probes.startup or spec.probes.readiness
    if probe is None:
        return 0.0
    return probe.initial_delay_s + probe.period_s * probe.failure_threshold
