"""Replicas in the plan: names, GPUs, ports, gates, migration and canary, each asserted whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.errors import ProfileErrors
from supervisor.export import k8s
from supervisor.plan import render as planmod
from supervisor.plan.spec import Condition, Dependency, Plan
from supervisor.profile import load as profiles

STATE = Path("/srv/state")


def render(name: str, *overrides: str) -> Plan:
    return planmod.render(
        profiles.load(name, overrides=overrides), state_root=STATE, python="/opt/py/bin/python"
    )


WORKERS = ("decode-0", "decode-1", "prefill-0", "prefill-1")


def flag(argv: tuple[str, ...], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_demo_ha_plans_each_replica_with_its_own_ports_dirs_and_logs() -> None:
    plan = render("demo-ha")
    assert [s.name for s in plan.processes] == ["frontend", *WORKERS]
    workers = [plan.process(n) for n in WORKERS]
    assert [s.group for s in workers] == ["decode", "decode", "prefill", "prefill"]
    assert [s.ports["system"] for s in workers] == [18281, 18282, 18283, 18284]
    assert [set(s.ports) for s in workers] == [{"system"}] * 4  # no bootstrap rendezvous port
    assert len({s.multiproc_dir for s in plan.processes}) == len({s.log_file for s in plan.processes}) == 5
    assert workers[2].log_file.endswith("/logs/prefill-0.log")
    # prefill waits for ONE healthy decode (min_ready), not for both
    assert workers[2].depends_on == (
        Dependency("frontend", Condition.STARTED),
        Dependency("decode", Condition.HEALTHY, min_ready=1),
    )
    assert plan.members("decode") == tuple(workers[:2])
    assert [s.name for s in plan.dependents("decode-1")] == ["prefill-0", "prefill-1"]


def test_migration_is_on_with_two_replicas_of_a_role_and_off_with_one() -> None:
    assert flag(render("demo-ha").process("frontend").argv, "--migration-limit") == "3"
    assert "--migration-limit" not in render("demo").process("frontend").argv
    assert (
        flag(render("demo", "frontend.migration_limit=5").process("frontend").argv, "--migration-limit")
        == "5"
    )
    assert "--migration-limit" not in render("demo-ha", "frontend.migration_limit=0").process("frontend").argv


def test_disagg_8gpu_takes_gpus_from_a_pool_and_from_explicit_lists() -> None:
    plan = render("disagg-8gpu")
    gpus = {s.name: s.env.get("CUDA_VISIBLE_DEVICES") for s in plan.processes if s.gpus}
    assert gpus == {
        "decode-0": "0",
        "decode-1": "1",
        "decode-2": "2",
        "decode-3": "3",
        "prefill-0": "4,5",
        "prefill-1": "6,7",
    }
    nixl = [s.ports["nixl"] for s in plan.processes if s.gpus]
    assert len(set(nixl)) == 6
    assert all(
        flag(s.argv, "--tensor-parallel-size") == ("2" if s.group == "prefill" else "1")
        for s in plan.processes
        if s.gpus
    )


def test_min_ready_is_carried_to_replicas_and_dependents() -> None:
    plan = render("demo-ha", "workers.decode.replicas=3", "workers.decode.min_ready=2")
    assert [s.min_ready for s in plan.members("decode")] == [2, 2, 2]
    assert Dependency("decode", Condition.HEALTHY, min_ready=2) in plan.process("prefill-0").depends_on


def test_one_replica_keeps_the_plain_name_and_ports() -> None:
    plan = render("demo")
    assert [(s.name, s.group, s.min_ready) for s in plan.processes] == [
        ("frontend", "frontend", 1),
        ("decode", "decode", 1),
        ("prefill", "prefill", 1),
    ]


def test_worker_canary_is_dynamos_env() -> None:
    spec = render("demo-ha", "workers.decode.canary={wait_s=20, request_timeout_s=4}").process("decode-1")
    assert {k: spec.env[k] for k in spec.env if "HEALTH_CHECK" in k or "CANARY" in k} == {
        "DYN_HEALTH_CHECK_ENABLED": "true",
        "DYN_CANARY_WAIT_TIME": "20",
        "DYN_HEALTH_CHECK_REQUEST_TIMEOUT": "4",
    }
    assert "DYN_HEALTH_CHECK_ENABLED" not in render("demo-ha").process("decode-1").env


def test_many_replicas_get_system_ports_past_the_metrics_port() -> None:
    plan = render("demo-ha", "workers.decode.replicas=6", "workers.prefill.replicas=6")
    system = [s.ports["system"] for s in plan.processes if "system" in s.ports]
    assert len(set(system)) == 12 and 18290 not in system and max(system) <= 18200 + 199


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ("workers.decode.replicas=2", "workers.decode.gpus=[0, 1, 2]"),
            "workers.decode.gpus: expected 2 GPU indices (2 replicas x tensor_parallel_size 1), got 3",
        ),
        (
            ("workers.decode.replicas=2", "workers.decode.gpus=[[0], [1], [2]]"),
            "workers.decode.gpus: lists GPUs for 3 replicas, but replicas is 2",
        ),
        (
            ("workers.decode.replicas=2", "workers.decode.gpus=[1, 2]"),
            "workers.prefill.gpus: GPU 1 is already given to worker 'decode' (set shared_gpus = true on both to share it)",
        ),
        (
            ("workers.decode.stop_timeout_s=4",),
            "workers.decode.stop_timeout_s: is 4 s, but Dynamo waits its 5 s grace period before it drains",
        ),
        (
            ("workers.decode.min_ready=2",),
            "workers.decode.min_ready: is 2, but the worker has only 1 replica",
        ),
        (
            ("frontend.args=['--migration-limit', '2']",),
            "frontend.args: --migration-limit is set by the supervisor",
        ),
    ],
)
def test_bad_replica_combinations_are_one_line_each(overrides: tuple[str, ...], expected: str) -> None:
    with pytest.raises(ProfileErrors) as info:
        profiles.load("disagg", overrides=overrides)
    assert any(expected in str(e) for e in info.value.errors), [str(e) for e in info.value.errors]


def test_shared_gpus_must_be_allowed_by_both_workers() -> None:
    base = ("workers.decode.gpus=[1]", "workers.decode.shared_gpus=true")
    with pytest.raises(ProfileErrors):
        profiles.load("disagg", overrides=base)
    profiles.load("disagg", overrides=(*base, "workers.prefill.shared_gpus=true"))


def test_k8s_export_makes_one_component_per_role_with_its_replica_count() -> None:
    components = k8s.export(render("demo-ha")).manifest["spec"]["components"]
    counts = {c["name"]: c["replicas"] for c in components}
    assert counts == {"Frontend": 1, "decode": 2, "prefill": 2}


def test_render_is_pure_for_replicas() -> None:
    loaded = profiles.load("demo-ha")
    assert planmod.render(loaded, state_root=Path("/s"), python="/p") == planmod.render(
        loaded, state_root=Path("/s"), python="/p"
    )


def test_systemd_start_budget_follows_a_dependency_on_a_replica_group() -> None:
    from supervisor.export import systemd

    single, replicated = render("demo"), render("demo-ha")
    assert systemd.critical_start_s(replicated) == systemd.critical_start_s(single) > 0
