"""The plan cache: an unchanged profile's plan comes back without pydantic; any change renders afresh."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import api
from supervisor.errors import ProfileErrors
from supervisor.host.plancache import KIND, PlanCache
from supervisor.plan.spec import to_jsonable

DEMO = Path(__file__).resolve().parents[2] / "profiles" / "demo.toml"


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LMCACHE_SUPERVISE_CACHE_DIR", str(root))
    monkeypatch.setenv("LMCACHE_SUPERVISE_STATE_ROOT", str(tmp_path / "state"))
    return root / KIND


def _profile(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "mine.toml"
    path.write_text(f'extends = "{DEMO}"\n{extra}')
    return path


def test_a_second_load_is_the_same_plan_from_the_cache(tmp_path: Path, cache_dir: Path) -> None:
    first = api.load_plan("demo")
    assert len(list(cache_dir.glob("*.json"))) == 1
    cached = PlanCache.for_profile("demo", (), None)
    assert cached is not None and cached.get() == first
    assert api.load_plan("demo") == first
    assert stat.S_IMODE(next(cache_dir.glob("*.json")).stat().st_mode) == 0o600  # it holds the env


def test_an_edited_profile_or_other_flags_render_afresh(tmp_path: Path, cache_dir: Path) -> None:
    path = _profile(tmp_path)
    before = api.load_plan(str(path))
    path.write_text(path.read_text() + "[ports]\nbase = 23000\n")
    after = api.load_plan(str(path))
    assert after.deployment.base_url != before.deployment.base_url
    assert after.deployment.base_url.endswith(":23000")
    overridden = api.load_plan(str(path), overrides=("ports.base=24000",))
    assert overridden.deployment.base_url.endswith(":24000")
    other = api.load_plan(str(path), model=str(tmp_path / "other-model"))
    assert str(tmp_path / "other-model") in json.dumps(to_jsonable(other))
    assert str(tmp_path / "other-model") not in json.dumps(to_jsonable(after))


def test_a_changed_environment_renders_afresh(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = api.load_plan("demo")
    monkeypatch.setenv("LMCACHE_SUPERVISE_STATE_ROOT", str(tmp_path / "elsewhere"))
    moved = api.load_plan("demo")
    assert moved.deployment.state_dir != first.deployment.state_dir
    assert str(tmp_path / "elsewhere") in moved.deployment.state_dir


def test_a_binary_installed_on_the_search_path_is_found(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    path = _profile(tmp_path, '[infra.nats]\nbinary = "lmcs-test-nats"\n')
    assert api.load_plan(str(path)) == api.load_plan(str(path))  # the second from the cache
    assert len(list(cache_dir.glob("*.json"))) == 1
    key = PlanCache.for_profile(str(path), (), None)
    assert key is not None and key.get() is not None
    installed = bin_dir / "lmcs-test-nats"
    installed.write_text("#!/bin/sh\n")
    installed.chmod(0o755)
    assert key.get() is None  # the search directory changed: rendered afresh next time


def test_an_invalid_profile_is_never_cached(tmp_path: Path, cache_dir: Path) -> None:
    path = _profile(tmp_path, "[ports]\nbase = -1\n")
    for _ in range(2):
        with pytest.raises(ProfileErrors):
            api.load_plan(str(path))
    assert not list(cache_dir.glob("*.json"))


def test_a_node_role_plan_is_not_cached(tmp_path: Path, cache_dir: Path) -> None:
    api.load_plan("demo", overrides=("discovery.backend=etcd",), role="head", advertise="127.0.0.1")
    assert not list(cache_dir.glob("*.json"))


def test_the_cache_keeps_a_bounded_number_of_entries(tmp_path: Path, cache_dir: Path) -> None:
    from supervisor.host import plancache

    for base in range(plancache.MAX_ENTRIES + 3):
        api.load_plan("demo", overrides=(f"ports.base={20000 + 10 * base}",))
    assert len(list(cache_dir.glob("*.json"))) == plancache.MAX_ENTRIES


START_PATH = """
import json, sys
from supervisor import api
plan = api.load_plan("demo")
import supervisor.cli.pipeline, supervisor.engine.foreground, supervisor.control.metrics
import supervisor.control.reload, supervisor.control.progress, supervisor.engine.gpuguard
heavy = [m for m in ("pydantic", "httpx", "prometheus_client", "rich") if m in sys.modules]
print(json.dumps({"plan": plan.deployment.name, "heavy": heavy}))
"""


def test_the_start_path_of_an_unchanged_profile_imports_no_heavy_library(
    tmp_path: Path, cache_dir: Path
) -> None:
    """What `up` imports before its first spawn once the plan is cached: none of the ~30-90 ms
    libraries (they come after the spawn, or on the paths that need them)."""
    api.load_plan("demo")  # fills the cache, with this very environment
    # The same environment and directory: the key the cache was filled under.
    out = subprocess.run([sys.executable, "-c", START_PATH], capture_output=True, text=True, check=True)
    answer = json.loads(out.stdout)
    assert answer == {"plan": "demo", "heavy": []}, out.stderr
