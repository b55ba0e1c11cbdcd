"""`lmcache-supervise up demo` for real: Dynamo frontend + mocker decode/prefill on CPU.

One supervisor serves the module (start-up ~1 s): ready and serving, decode and frontend SIGKILLed
and restarted, then `down` (SIGTERM) for the orderly shutdown. A second supervisor is SIGKILLed to
show that no child outlives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import alive, group_alive, wait_for
from harness import CLI, Deployment

pytestmark = pytest.mark.e2e


def start_demo(tmp: Path) -> Deployment:
    demo = Deployment(tmp, echo_children=True).start()
    try:
        demo.wait_ready()
    except BaseException:
        demo.stop_clean()
        raise
    return demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    running = start_demo(tmp_path_factory.mktemp("demo"))
    try:
        yield running
    finally:
        running.stop_clean()


def test_up_demo_is_ready_and_serves(demo: Deployment) -> None:
    assert f"ready: OpenAI API at {demo.url}/v1 (model demo)" in demo.stdout
    response = demo.chat()
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] > 0
    assert (demo.state_dir / "logs" / "decode.log").stat().st_size > 0
    assert int((demo.state_dir / "supervisor.pid").read_text()) == demo.proc.pid


@pytest.mark.parametrize("name", ["decode", "frontend"])
def test_sigkilled_process_is_restarted_and_serves_again(demo: Deployment, name: str) -> None:
    old = demo.newest_pid(name)
    assert old is not None and alive(old)
    readies = demo.count("deployment ready")
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: demo.newest_pid(name) not in (None, old), 10, what=f"{name} respawned")
    wait_for(lambda: demo.count("deployment ready") > readies, 30, what="deployment ready again")
    assert not alive(old)
    response = demo.chat()
    assert response.status_code == 200, response.text
    if name == "decode":  # its lingering registration was removed, not left for the lease to lapse
        forgotten = [e for e in demo.event_data() if e.get("event") == "removed stale discovery entries"]
        assert forgotten and forgotten[-1]["process"] == "decode"


def test_down_stops_in_reverse_order_and_cleans_up(demo: Deployment) -> None:
    pids = {name: demo.newest_pid(name) for name in ("frontend", "decode", "prefill")}
    started = time.monotonic()
    done = subprocess.run([CLI, "down"], env=demo.env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 15
    assert demo.proc.wait(timeout=30) == 0
    events = demo.event_data()
    after = events[max(i for i, e in enumerate(events) if e.get("event") == "shutdown requested") :]
    order = [e["process"] for e in after if e.get("event") == "process stopping"]
    assert order == ["prefill", "decode", "frontend"]
    assert not any(alive(pid) for pid in pids.values())
    assert not any(group_alive(pid) for pid in pids.values())
    prometheus = demo.state_dir / "prometheus"
    assert not [p.name for p in prometheus.glob("*")] if prometheus.exists() else True
    assert not (demo.state_dir / "supervisor.pid").exists()


def test_sigkilled_supervisor_takes_every_child_with_it(tmp_path: Path) -> None:
    demo = start_demo(tmp_path)
    try:
        tree = psutil.Process(demo.proc.pid).children(recursive=True)
        pids = [p.pid for p in tree]
        groups = {os.getpgid(pid) for pid in pids}
        assert len(pids) >= 4  # guardian + frontend + decode + prefill
        demo.proc.kill()
        demo.proc.wait()
        started = time.monotonic()
        wait_for(lambda: not any(alive(pid) for pid in pids), 10, what="every child gone")
        wait_for(lambda: not any(group_alive(g) for g in groups), 10, what="every group empty")
        assert time.monotonic() - started < 5
    finally:
        demo.stop_clean()
