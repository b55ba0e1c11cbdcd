"""Reload step by step: which specs changed, what is refused, the outcome file, Runner.apply."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from conftest import alive

from supervisor.control import reload
from supervisor.control.client import Endpoint
from supervisor.engine.runner import Runner
from supervisor.engine.states import DeploymentState, DeploymentStatus, ProcessState
from supervisor.errors import ControlError, ProfileError
from supervisor.plan import render as planmod
from supervisor.plan.spec import Plan
from supervisor.profile import load as profiles

STATE = Path("/srv/state")


def demo(*overrides: str) -> Plan:
    return planmod.render(
        profiles.load("demo", overrides=overrides), state_root=STATE, python="/opt/py/bin/python"
    )


def test_one_workers_env_changes_only_that_worker() -> None:
    changes = reload.diff(demo(), demo("workers.decode.env.GREETING=hello"))
    assert changes == reload.PlanDiff(
        added=(), removed=(), changed=("decode",), unchanged=("frontend", "prefill")
    )
    assert changes.describe() == "restarted decode"


def test_same_profile_changes_nothing() -> None:
    changes = reload.diff(demo(), demo())
    assert changes.empty and changes.describe() == "nothing changed"


def test_a_shared_setting_changes_every_process_it_reaches() -> None:
    # [env] is every process's environment: all three restart.
    assert reload.diff(demo(), demo("env.GREETING=hello")).changed == ("frontend", "decode", "prefill")


def test_added_and_removed_workers(tmp_path: Path) -> None:
    three = tmp_path / "three.toml"
    three.write_text(
        f'extends = "{profiles.resolve("demo")}"\nname = "demo"\n[workers.decode2]\nrole = "decode"\n'
    )
    bigger = planmod.render(profiles.load(str(three)), state_root=STATE, python="/opt/py/bin/python")
    grown = reload.diff(demo(), bigger)
    assert grown.added == ("decode2",) and grown.removed == ()
    # prefill's ports and its dependency list moved with the new worker: it restarts too. Two
    # decode workers turn request migration on (frontend.migration_limit's default): so does the frontend.
    assert "prefill" in grown.changed and "frontend" in grown.changed
    assert "--migration-limit" in bigger.process("frontend").argv
    shrunk = reload.diff(bigger, demo())
    assert shrunk.removed == ("decode2",) and shrunk.added == ()


def test_renaming_the_deployment_is_refused() -> None:
    renamed = planmod.render(profiles.load("demo-agg"), state_root=STATE, python="/opt/py/bin/python")
    why = reload.refusal(demo(), renamed)
    assert why is not None and "name 'demo-agg' instead of 'demo'" in why
    assert reload.refusal(demo(), demo("workers.decode.env.X=one")) is None


def test_outcome_file_round_trip_and_garbage(tmp_path: Path) -> None:
    outcome = reload.Outcome(pid=12, serial=3, ok=True, message="restarted decode", restarted=("decode",))
    reload.write_outcome(tmp_path, outcome)
    assert reload.read_outcome(tmp_path) == outcome
    assert [p.name for p in tmp_path.iterdir()] == ["reload.json"]
    (tmp_path / "reload.json").write_text("{not json")
    assert reload.read_outcome(tmp_path) is None
    (tmp_path / "reload.json").write_text('{"pid": 1}')
    assert reload.read_outcome(tmp_path) is None


def test_request_to_a_gone_supervisor_is_a_control_error(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    endpoint = Endpoint("demo", tmp_path, gone.pid, str(tmp_path / "control.sock"))
    with pytest.raises(ControlError, match=f"supervisor pid {gone.pid}.* does not answer"):
        reload.request(endpoint, timeout_s=1)


class FakeRunner:
    """Just enough of the runner for the reload steps: records what it was asked to do."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.applied: list[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = []

    def status(self) -> DeploymentStatus:
        return DeploymentStatus(
            name="demo",
            state=DeploymentState.READY,
            base_url="",
            model="demo",
            ready_since_wall=None,
            processes=(),
        )

    async def apply(
        self, plan: Plan, *, restart: tuple[str, ...], start: tuple[str, ...], stop: tuple[str, ...]
    ) -> None:
        self.plan = plan
        self.applied.append((restart, start, stop))

    async def wait_until(
        self, predicate: Callable[[DeploymentStatus], bool], *, timeout_s: float
    ) -> DeploymentStatus:
        return self.status()


@pytest.mark.anyio
async def test_a_bad_profile_is_refused_and_nothing_is_applied(tmp_path: Path) -> None:
    plan = planmod.render(profiles.load("demo"), state_root=tmp_path, python="/opt/py/bin/python")
    runner = FakeRunner(plan)
    said: list[tuple[str, str]] = []

    def broken() -> Plan:
        raise ProfileError("demo.toml", "workers.decode.role", "expected one of 'agg', 'decode' or 'prefill'")

    reloader = reload.Reloader(
        broken, on_begin=lambda t: said.append(("begin", t)), on_end=lambda t: said.append(("end", t))
    )
    outcome = await reloader(runner)
    assert not outcome.ok and "workers.decode.role" in outcome.message
    assert runner.applied == [] and runner.plan is plan
    assert [kind for kind, _ in said] == ["begin", "end"] and said[1][1].startswith("reload refused: ")
    assert reload.read_outcome(tmp_path / "demo") == outcome
    assert outcome.pid == os.getpid() and outcome.serial == 1


@pytest.mark.anyio
async def test_a_good_profile_is_applied_as_a_diff(tmp_path: Path) -> None:
    plan = planmod.render(profiles.load("demo"), state_root=tmp_path, python="/opt/py/bin/python")
    runner = FakeRunner(plan)
    new = planmod.render(
        profiles.load("demo", overrides=["workers.prefill.env.X=one"]),
        state_root=tmp_path,
        python="/opt/py/bin/python",
    )
    outcome = await reload.Reloader(lambda: new)(runner)
    assert outcome.ok and outcome.restarted == ("prefill",) and outcome.message == "restarted prefill"
    assert runner.applied == [(("prefill",), (), ())] and runner.plan is new


# ---- Runner.apply with fixture children: the reload's effect on real processes ------------------


@pytest.mark.anyio
async def test_runner_apply_restarts_changed_starts_added_stops_removed(make_spec, make_plan) -> None:
    keep, change, drop = make_spec("keep"), make_spec("change"), make_spec("drop")
    runner = Runner(make_plan(keep, change, drop))

    def running(status: DeploymentStatus) -> bool:
        return all(p.state is ProcessState.RUNNING for p in status.processes)

    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.serve)
        first = await runner.wait_until(running, timeout_s=10)
        pids = {p.name: p.pid for p in first.processes}
        new_plan = make_plan(keep, make_spec("change", env={"X": "1"}), make_spec("add"))
        changes = reload.diff(runner.plan, new_plan)
        assert (changes.changed, changes.added, changes.removed) == (("change",), ("add",), ("drop",))
        await runner.apply(new_plan, restart=changes.changed, start=changes.added, stop=changes.removed)
        after = await runner.wait_until(running, timeout_s=10)
        assert [p.name for p in after.processes] == ["keep", "change", "add"]  # new start order
        new_pids = {p.name: p.pid for p in after.processes}
        assert new_pids["keep"] == pids["keep"]
        assert new_pids["change"] != pids["change"] and not alive(pids["change"])
        assert not alive(pids["drop"]) and alive(new_pids["add"])
        assert runner.plan is new_plan
        runner.request_shutdown()
    assert not any(alive(pid) for pid in new_pids.values())


@pytest.mark.anyio
async def test_shutdown_during_apply_starts_nothing_new_and_leaves_nothing(make_spec, make_plan) -> None:
    slow = make_spec("slow", stop_timeout_s=1.0)
    runner = Runner(make_plan(slow))
    started: list[str] = []
    runner.subscribe(
        lambda e: started.append(e.name) if getattr(e, "new", None) is ProcessState.STARTING else None
    )
    codes: list[int] = []
    async with anyio.create_task_group() as tg:

        async def serve() -> None:
            codes.append(await runner.serve())

        tg.start_soon(serve)
        first = await runner.wait_until(
            lambda s: s.process("slow").state is ProcessState.RUNNING, timeout_s=10
        )
        old_pid = first.process("slow").pid
        new_plan = make_plan(make_spec("slow", env={"X": "1"}, stop_timeout_s=1.0), make_spec("extra"))
        tg.start_soon(lambda: runner.apply(new_plan, restart=("slow",), start=("extra",)))
        await anyio.lowlevel.checkpoint()  # apply is now stopping the old "slow"
        runner.request_shutdown(reason="test")
    assert codes == [0]
    assert started == ["slow"]  # the first start only: neither the new "slow" nor "extra" after shutdown
    final = runner.status()
    assert all(p.pid is None for p in final.processes), final
    assert old_pid is not None and not alive(old_pid)


def test_turning_cluster_authentication_on_or_off_is_refused() -> None:
    secure = demo('discovery.backend="etcd"', 'ports.host="0.0.0.0"', "discovery.insecure_planes=true")
    insecure = demo('discovery.backend="etcd"', 'ports.host="0.0.0.0"', "discovery.insecure=true")
    assert secure.deployment.credentials_file.endswith("/demo/cluster-credentials")
    for old, new in ((secure, insecure), (insecure, secure)):
        why = reload.refusal(old, new)
        assert why is not None and "credentials_file" in why and "stop it and start it again" in why
