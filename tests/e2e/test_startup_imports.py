"""What `up demo` imports, read from Python's own import log (PYTHONPROFILEIMPORTTIME) of the real
command: once its plan is cached, nothing heavy comes before the first spawn, and a deployment of
plain-HTTP checks never imports httpx at all (the lean client serves probes, gate and smoke)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from harness import MARKER, Deployment, free_port_base

pytestmark = pytest.mark.e2e
IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$")


def _imports_until_spawn_and_all(dep: Deployment) -> tuple[set[str], set[str]]:
    before: set[str] = set()
    spawned, every = False, set()
    for line in dep.stderr_text:
        if '"process starting"' in line:
            spawned = True
        found = IMPORTED.match(line.rstrip())
        if found:
            every.add(found.group(1))
            if not spawned:
                before.add(found.group(1))
    return before, every


def test_the_start_path_imports_nothing_heavy_and_never_httpx(tmp_path: Path) -> None:
    base, state = free_port_base(), tmp_path / "state"
    runs = [Deployment(tmp_path / name, base=base, state_root=state) for name in ("fill", "cached")]
    for dep in runs:  # the same flags and environment: the second start finds the plan cache
        dep.marker = runs[0].marker
        dep.env.update({MARKER: runs[0].marker, "PYTHONPROFILEIMPORTTIME": "1"})
        with dep:
            dep.wait_ready()
            dep.stop_clean()
    dep = runs[1]
    before, every = _imports_until_spawn_and_all(dep)
    assert "supervisor.engine.runner" in before  # the log was read (the runner comes before any spawn)
    heavy = {"pydantic", "httpx", "prometheus_client", "rich"}
    assert not heavy & before, sorted(heavy & before)
    assert "prometheus_client" in every  # the metrics service, after the spawn
    assert "httpx" not in every
