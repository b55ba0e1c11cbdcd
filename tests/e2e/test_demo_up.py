"""`lmcache-supervise up demo` for real: Dynamo frontend + mocker decode/prefill on CPU.

One supervisor serves the module (start-up ~1 s): ready and serving, decode and frontend SIGKILLed
and restarted, then `down` (SIGTERM) for the orderly shutdown. A second supervisor is SIGKILLed to
show that no child outlives it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import MARKER, SESSION, alive, free_port_base, group_alive, reap_marked, wait_for

pytestmark = pytest.mark.e2e
CLI = str(Path(sys.executable).parent / "lmcache-supervise")
DEMO_PORT_OFFSETS = (0, 81, 82, 90, 601)  # frontend, decode/prefill system, metrics, bootstrap
# A prefill request whose decode side died (a smoke request routed to the SIGKILLed decode's
# lingering discovery entry) keeps the mocker prefill's graceful shutdown waiting ~30 s, the
# profile's worker stop timeout: shorter timeouts keep the suite fast; SIGKILL follows them.
FAST_STOP = ("--set", "workers.decode.stop_timeout_s=3", "--set", "workers.prefill.stop_timeout_s=3")


@dataclass
class Demo:
    """A running `up demo` and what it says."""

    proc: subprocess.Popen[bytes]
    state_root: Path
    base: int
    marker: str
    stdout: Path
    stderr: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.base}"

    @property
    def state_dir(self) -> Path:
        return self.state_root / "demo"

    def events(self) -> list[dict]:
        out = []
        for line in self.stderr.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def count(self, event: str) -> int:
        return sum(e.get("event") == event for e in self.events())

    def pid(self, name: str) -> int | None:
        """The pid of the newest incarnation of ``name``."""
        pids = [e["pid"] for e in self.events() if e.get("event") == "process starting" and e.get("process") == name]
        return pids[-1] if pids else None

    def chat(self) -> httpx.Response:
        body = {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
        with httpx.Client(trust_env=False) as client:
            return client.post(f"{self.url}/v1/chat/completions", json=body, timeout=30)


def start_demo(tmp: Path) -> Demo:
    base = free_port_base(DEMO_PORT_OFFSETS[-1] + 1)
    marker = f"{SESSION}-e2e-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "LMCACHE_SUPERVISE_STATE_ROOT": str(tmp / "state"), MARKER: marker}
    env.pop("LMCACHE_SUPERVISE_DEBUG", None)
    stdout, stderr = tmp / "up.out", tmp / "up.err"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen([CLI, "up", "demo", "--set", f"ports.base={base}", *FAST_STOP], stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, env=env)
    demo = Demo(proc, tmp / "state", base, marker, stdout, stderr, env)
    try:
        wait_for(lambda: "ready:" in stdout.read_text() or proc.poll() is not None, 60, what="demo ready")
        assert proc.poll() is None, stderr.read_text()[-3000:]
    except BaseException:
        stop_demo(demo)
        raise
    return demo


def stop_demo(demo: Demo) -> None:
    if demo.proc.poll() is None:
        demo.proc.send_signal(signal.SIGTERM)
        try:
            demo.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            demo.proc.kill()
            demo.proc.wait()
    leaked = reap_marked(demo.marker)
    assert not leaked, f"processes left behind: {leaked}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    running = start_demo(tmp_path_factory.mktemp("demo"))
    try:
        yield running
    finally:
        stop_demo(running)


def test_up_demo_is_ready_and_serves(demo: Demo) -> None:
    assert f"ready: OpenAI API at {demo.url}/v1 (model demo)" in demo.stdout.read_text()
    response = demo.chat()
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] > 0
    assert (demo.state_dir / "logs" / "decode.log").stat().st_size > 0
    assert int((demo.state_dir / "supervisor.pid").read_text()) == demo.proc.pid


@pytest.mark.parametrize("name", ["decode", "frontend"])
def test_sigkilled_process_is_restarted_and_serves_again(demo: Demo, name: str) -> None:
    old = demo.pid(name)
    assert old is not None and alive(old)
    readies = demo.count("deployment ready")
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: demo.pid(name) not in (None, old), 10, what=f"{name} respawned")
    wait_for(lambda: demo.count("deployment ready") > readies, 30, what="deployment ready again")
    assert not alive(old)
    response = demo.chat()
    assert response.status_code == 200, response.text
    if name == "decode":  # its lingering registration was removed, not left for the lease to lapse
        forgotten = [e for e in demo.events() if e.get("event") == "removed stale discovery entries"]
        assert forgotten and forgotten[-1]["process"] == "decode"


def test_down_stops_in_reverse_order_and_cleans_up(demo: Demo) -> None:
    pids = {name: demo.pid(name) for name in ("frontend", "decode", "prefill")}
    started = time.monotonic()
    done = subprocess.run([CLI, "down"], env=demo.env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 15
    assert demo.proc.wait(timeout=30) == 0
    events = demo.events()
    after = events[max(i for i, e in enumerate(events) if e.get("event") == "shutdown requested"):]
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
        stop_demo(demo)
