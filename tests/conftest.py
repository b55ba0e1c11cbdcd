"""Shared test helpers: condition waits with deadlines, free ports, and a leak check.

Every test runs with ``LMCACHE_SUPERVISE_TEST_MARKER`` set to a value unique to that test; every
child, grandchild and supervisor it starts inherits it. After the test, any live process still
carrying that value in its environment is a leak: it is killed and the test fails.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import proctools  # scripts/ (pytest pythonpath): shared with the benchmarks, the soak and the GPU validation
import psutil
import pytest
from realredis import redis_factory  # noqa: F401  (a fixture for every test that needs a real Redis)

CLI = proctools.CLI
# The worker-interpreter probe cache of every supervisor the tests start: one per test session, so a
# run never reads (or writes) the user's ~/.cache/lmcache-supervise.
PROBE_CACHE = tempfile.mkdtemp(prefix="lmcs-test-cache-")
os.environ["LMCACHE_SUPERVISE_CACHE_DIR"] = os.path.join(PROBE_CACHE, "cache")
MARKER = "LMCACHE_SUPERVISE_TEST_MARKER"
SESSION = uuid.uuid4().hex[:12]
FIXTURE_CHILD = str(Path(__file__).parent / "fixtures" / "child.py")
T = TypeVar("T")


# tests/engines/ needs the multi-GB engines venv: only `make test-engines` (which sets this) collects it.
collect_ignore = [] if os.environ.get("LMCACHE_SUPERVISE_ENGINES_PYTHON") else ["engines"]


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(PROBE_CACHE, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end tests that run the real Dynamo frontend and mocker")


def wait_for(predicate: Callable[[], T], timeout: float, *, interval: float = 0.01, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    try:
        return proctools.wait_for(predicate, timeout, interval=interval, what=what)
    except TimeoutError as exc:
        pytest.fail(str(exc))


def free_port_base(count: int = 20) -> int:
    """A base port with ``count`` free ports above it (below 32767: Dynamo parses ports as int16)."""
    return proctools.free_port_base(range(count))


def marked(value: str) -> list[psutil.Process]:
    """Live processes (not zombies, not us) whose environment carries ``MARKER=value``."""
    return proctools.marked(MARKER, value)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (init here reaps orphans only every ~1 s)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def group_alive(pgid: int) -> bool:
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def reap_marked(value: str, timeout: float = 5.0) -> list[str]:
    """Wait for marked processes to go; SIGKILL the rest. Returns descriptions of the leaked ones."""
    return proctools.reap_marked(MARKER, value, timeout)


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[str]:
    """Give the test its own marker value and fail it if any marked process outlives it."""
    value = f"{SESSION}-{uuid.uuid4().hex[:8]}"
    old = os.environ.get(MARKER)
    os.environ[MARKER] = value
    try:
        yield value
    finally:
        if old is None:
            os.environ.pop(MARKER, None)
        else:
            os.environ[MARKER] = old
        leaked = reap_marked(value)
        assert not leaked, f"processes left behind: {leaked}"


@pytest.fixture(name="wait_for")
def wait_for_fixture() -> Callable[..., object]:
    return wait_for


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture
def make_spec(tmp_path: Path) -> Callable[..., object]:
    """Build a ProcessSpec running the fixture child with ``args``; keyword overrides go to the spec."""
    from supervisor.plan.spec import ProcessSpec, Role

    def make(name: str, *args: str, **overrides: object) -> ProcessSpec:
        fields: dict[str, object] = dict(
            name=name,
            role=Role.CUSTOM,
            argv=(sys.executable, FIXTURE_CHILD, *args),
            env={},
            gpus=(),
            ports={},
            multiproc_dir=str(tmp_path / "prometheus" / name),
            log_file=str(tmp_path / "logs" / f"{name}.log"),
            stop_timeout_s=5.0,
        )
        fields.update(overrides)
        return ProcessSpec(**fields)  # type: ignore[arg-type]

    return make


@pytest.fixture
def make_plan(tmp_path: Path) -> Callable[..., object]:
    """Build a Plan around ``processes``; no ready URL and no smoke request unless given."""
    from supervisor.plan.spec import Plan

    def make(
        *processes: object,
        ready_url: str = "",
        smoke: object = None,
        ready_timeout_s: float = 30.0,
        base_url: str = "http://127.0.0.1:1",
    ) -> Plan:
        dep = proctools.fixture_deployment(
            "test",
            tmp_path,
            base_url=base_url,
            ready_url=ready_url,
            smoke=smoke,
            ready_timeout_s=ready_timeout_s,
        )
        return Plan(deployment=dep, processes=tuple(processes))  # type: ignore[arg-type]

    return make
