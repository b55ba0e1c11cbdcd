"""Rolling restarts over the control socket with real child processes: one replica at a time, never
below min_ready, refusals before anything is touched. (The frontend-registration step is proved by
tests/e2e/test_ha.py with the real Dynamo frontend.)"""

from __future__ import annotations

import dataclasses

import pytest
from conftest import free_port_base
from test_control import ask, controlled

from supervisor.control import rolling
from supervisor.engine.states import DeploymentState, ProcessEvent, ProcessState
from supervisor.errors import BadRequestError
from supervisor.plan.spec import HttpCheck, Probe, Probes, Role

pytestmark = pytest.mark.anyio
P = ProcessState


def health(port: int) -> Probes:
    check = HttpCheck(url=f"http://127.0.0.1:{port}/health", owned_port=port)
    return Probes(
        startup=Probe(check=check, period_s=0.05, timeout_s=0.5, failure_threshold=200),
        readiness=Probe(check=check, period_s=0.1, timeout_s=0.5, failure_threshold=2),
    )


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[float, object]] = []

    def __call__(self, event: object) -> None:
        self.events.append((0.0, event))


def group(make_spec, name: str, n: int, base: int, **kw):
    return [
        make_spec(f"{name}-{i}", "--port", str(base + i), group=name, probes=health(base + i), **kw)
        for i in range(n)
    ]


def healthy_counts(rec: Recorder, names: list[str]) -> list[int]:
    """How many of ``names`` were RUNNING after each of their events, in order."""
    state = dict.fromkeys(names, P.RUNNING)
    counts = []
    for _, event in rec.events:
        if isinstance(event, ProcessEvent) and event.name in state:
            state[event.name] = event.new
            counts.append(sum(s is P.RUNNING for s in state.values()))
    return counts


async def test_a_role_is_restarted_one_replica_at_a_time(make_spec, make_plan) -> None:
    base = free_port_base(3)
    specs = group(make_spec, "w", 3, base, role=Role.DECODE)
    rec = Recorder()
    async with controlled(make_plan(*specs)) as (runner, _, endpoint):
        await runner.wait_until(lambda s: all(p.state is P.RUNNING for p in s.processes), timeout_s=10)
        before = {p.name: p.pid for p in runner.status().processes}
        unsubscribe = runner.subscribe(rec)
        answer = await ask(endpoint, {"op": "restart", "process": "w", "wait_s": 20}, timeout_s=60)
        unsubscribe()  # the shutdown after the block is not part of the roll
        after = {p.name: p.pid for p in runner.status().processes}
    assert [s["name"] for s in answer["steps"]] == ["w-0", "w-1", "w-2"]
    assert all(
        after[n] != before[n] and s["old_pid"] == before[n] and s["new_pid"] == after[n]
        for n, s in zip(["w-0", "w-1", "w-2"], answer["steps"])
    )
    counts = healthy_counts(rec, ["w-0", "w-1", "w-2"])
    assert min(counts) == 2, counts  # never two replicas down at once
    stops = [e.name for _, e in rec.events if isinstance(e, ProcessEvent) and e.new is P.STOPPING]
    assert stops == ["w-0", "w-1", "w-2"]
    assert answer["deployment_state"] == "ready"


async def test_all_means_every_worker_and_single_replicas_need_allow_downtime(make_spec, make_plan) -> None:
    base = free_port_base(3)
    front = make_spec("front", "--port", str(base + 2), probes=health(base + 2), role=Role.FRONTEND)
    lone = make_spec("lone", role=Role.PREFILL)
    specs = [front, *group(make_spec, "w", 2, base, role=Role.DECODE), lone]
    async with controlled(make_plan(*specs)) as (runner, _, endpoint):
        await runner.wait_until(lambda s: all(p.state is P.RUNNING for p in s.processes), timeout_s=10)
        before = {p.name: p.pid for p in runner.status().processes}
        for request in ({"all": True}, {"process": "lone"}, {"process": "front"}):
            with pytest.raises(
                BadRequestError, match="would stop serving: .* has 1 replica and needs 1 healthy"
            ):
                await ask(endpoint, {"op": "restart", "wait_s": 10, **request})
        assert {p.name: p.pid for p in runner.status().processes} == before  # refused: nothing touched
        with pytest.raises(
            BadRequestError, match="--no-wait restarts one process; w-0, w-1 restart one at a time"
        ):
            await ask(endpoint, {"op": "restart", "process": "w", "wait_s": 0})
        with pytest.raises(BadRequestError, match="no process 'nope' .*; roles: w\\)"):
            await ask(endpoint, {"op": "restart", "process": "nope"})
        answer = await ask(
            endpoint, {"op": "restart", "all": True, "allow_downtime": True, "wait_s": 20}, timeout_s=60
        )
        after = {p.name: p.pid for p in runner.status().processes}
    assert [s["name"] for s in answer["steps"]] == ["w-0", "w-1", "lone"]
    assert after["front"] == before["front"] and all(after[n] != before[n] for n in ("w-0", "w-1", "lone"))


async def test_a_replica_is_restarted_only_once_its_sibling_is_healthy(make_spec, make_plan) -> None:
    base = free_port_base(2)
    w0, w1 = group(make_spec, "w", 2, base, role=Role.DECODE)
    async with controlled(make_plan(w0, w1)) as (runner, _, endpoint):
        await runner.wait_until(lambda s: all(p.state is P.RUNNING for p in s.processes), timeout_s=10)
        await runner.stop("w-0")
        old = runner.status().process("w-1").pid
        with pytest.raises(Exception, match="fewer than 1 other w replicas are healthy after 0.5 s"):
            await ask(endpoint, {"op": "restart", "process": "w-1", "wait_s": 0.5})
        assert runner.status().process("w-1").pid == old  # never stopped: it is the last one serving
        await runner.start("w-0")
        answer = await ask(endpoint, {"op": "restart", "process": "w-1", "wait_s": 10})
        assert answer["steps"][0]["old_pid"] == old and runner.status().state is DeploymentState.READY


def test_downtime_names_each_group_that_would_drop_below_min_ready(make_spec, make_plan) -> None:
    specs = [
        *[dataclasses.replace(s, min_ready=2) for s in group(make_spec, "w", 2, 1)],
        *group(make_spec, "v", 2, 3),
    ]
    plan = make_plan(*specs)
    assert rolling.downtime(plan, ["w-0"]) == ["w has 2 replicas and needs 2 healthy"]
    assert rolling.downtime(plan, ["v-0", "v-1"]) == []
    assert rolling.resolve(plan, "v") == ("v-0", "v-1") and rolling.resolve(plan, "w-1") == ("w-1",)


async def test_status_metrics_and_systemd_line_name_a_failed_replica(make_spec, make_plan) -> None:
    from supervisor.control import metrics as metricsmod
    from supervisor.control import notify
    from supervisor.control.progress import Timeline

    base = free_port_base(1)
    loop = dataclasses.replace(
        make_spec("w-1").restart, backoff_initial_s=0.01, jitter=0.0, limit_starts=2, failed_retry_s=600.0
    )
    good = make_spec("w-0", "--port", str(base), group="w", probes=health(base), role=Role.DECODE)
    bad = make_spec("w-1", "--exit-after", "0", "--exit-code", "3", group="w", role=Role.DECODE, restart=loop)
    plan = make_plan(good, bad)
    async with controlled(plan) as (runner, _, endpoint):
        status = await runner.wait_until(lambda s: s.process("w-1").state is P.FAILED, timeout_s=10)
        doc = (await ask(endpoint, {"op": "status"}))["status"]
    assert doc["deployment"]["state"] == "degraded"
    assert doc["roles"] == [{"role": "w", "healthy": 1, "replicas": 2, "min_ready": 1, "failed": ["w-1"]}]
    line = notify.describe(status)
    assert line.startswith("degraded: 1/2 processes healthy; w-1 failed (") and "crash loop" in line
    assert "retrying in 600 s" in line
    metrics = metricsmod.SupervisorMetrics(plan, Timeline())
    metrics.refresh(status, plan)
    value = metrics.registry.get_sample_value
    assert value("lmcache_supervise_role_healthy_replicas", {"deployment": "test", "role": "w"}) == 1
    assert value("lmcache_supervise_role_replicas", {"deployment": "test", "role": "w"}) == 2
    assert (
        value(
            "lmcache_supervise_process_state",
            {"deployment": "test", "process": "w-1", "role": "decode", "state": "failed"},
        )
        == 1
    )
