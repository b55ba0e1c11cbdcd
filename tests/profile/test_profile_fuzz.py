"""Property tests: any profile content gives a plan or a clean bad-input error, never a crash."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.errors import EXIT_BAD_INPUT, SupervisorError
from supervisor.plan import render as planmod
from supervisor.profile import load as profiles

STATE = Path("/srv/state")
BASES = {name: profiles.load_raw(profiles.resolve(name)) for name in ("demo", "disagg", "agg")}

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["yes", "on", "10GB", "--help", "redis://:pw@h:1", "../x", "", "0", "SIGTERM", "decode"]),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


def key_paths(data: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            paths += key_paths(value, (*prefix, key))
    return paths


def outcome(data: dict[str, Any]) -> None:
    """Validate and render; only the supervisor's own bad-input errors may escape, with a key."""
    try:
        profile = profiles.validate(data, "fuzz.toml")
        plan = planmod.render(profile, state_root=STATE, python="/usr/bin/python3")
    except SupervisorError as exc:
        assert exc.exit_code == EXIT_BAD_INPUT, exc
        message = str(exc)
        assert message.startswith("fuzz.toml"), message
        assert "\n" not in message
        return
    # A plan that renders is internally consistent.
    ports = [p for spec in plan.processes for p in spec.ports.values()]
    assert len(ports) == len(set(ports))
    assert all(1 <= p <= 65535 for p in ports)
    for spec in plan.processes:
        assert all(isinstance(a, str) for a in spec.argv)
        assert spec.argv[3:] and not any(
            a.startswith("-") for a in (profile.model.name, plan.deployment.served_model_name)
        )
        if spec.role.is_worker:
            assert int(spec.env["DYN_SYSTEM_PORT"]) <= 32767


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(sorted(BASES)), data=st.data(), value=values)
def test_any_value_in_any_field(base: str, data: st.DataObject, value: Any) -> None:
    doc = copy.deepcopy(BASES[base])
    path = data.draw(st.sampled_from(key_paths(doc)))
    target = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    outcome(doc)


@settings(max_examples=200, deadline=None)
@given(
    base=st.sampled_from(sorted(BASES)),
    extra_key=st.text(min_size=1, max_size=15),
    value=values,
    where=st.sampled_from([(), ("lmcache",), ("frontend",), ("ports",), ("workers",), ("model",)]),
)
def test_any_new_key_anywhere(base: str, extra_key: str, value: Any, where: tuple[str, ...]) -> None:
    doc = copy.deepcopy(BASES[base])
    target = doc
    for part in where:
        target = target.setdefault(part, {})
    target[extra_key] = value
    outcome(doc)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_random_toml_documents(tmp_path_factory, text: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.toml"
    path.write_bytes(text.encode("utf-8", errors="replace"))
    try:
        profiles.load(str(path))
    except SupervisorError as exc:
        assert exc.exit_code == EXIT_BAD_INPUT
        assert "\n" not in str(exc)
        assert "fuzz.toml" in str(exc)


@settings(max_examples=100, deadline=None)
@given(overrides=st.lists(st.text(max_size=30), max_size=3))
def test_random_overrides(overrides: list[str]) -> None:
    try:
        profile = profiles.load("demo", overrides=overrides)
        planmod.render(profile, state_root=STATE, python="/usr/bin/python3")
    except SupervisorError as exc:
        assert exc.exit_code == EXIT_BAD_INPUT
        assert "\n" not in str(exc)


def test_nan_and_infinity_are_refused_where_numbers_bound() -> None:
    for value in (math.nan, math.inf):
        doc = copy.deepcopy(BASES["demo"])
        doc.setdefault("lmcache", {})["max_local_cpu_size"] = value
        try:
            profiles.validate(doc, "fuzz.toml")
        except SupervisorError as exc:
            assert "lmcache.max_local_cpu_size" in str(exc)
        else:
            raise AssertionError(f"max_local_cpu_size={value} was accepted")
