"""Probes against real sockets and real children: http, tcp, exec, thresholds, port ownership."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest
from conftest import FIXTURE_CHILD, free_port_base, wait_for

from supervisor.engine.probes import Tally, port_owned_by_tree, run_check
from supervisor.plan.spec import ExecCheck, HttpCheck, Probe, TcpCheck

pytestmark = pytest.mark.anyio


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b'{"status": "ready", "nested": {"n": 3}}' if self.path == "/ok" else b"nope"
        self.send_response(200 if self.path == "/ok" else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stranger() -> Iterator[int]:
    """An HTTP server owned by the test process itself: a stranger to any child."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
async def client() -> httpx.AsyncClient:
    async with httpx.AsyncClient(trust_env=False) as c:
        yield c


async def test_http_status_and_json_field(stranger: int, client: httpx.AsyncClient) -> None:
    base = f"http://127.0.0.1:{stranger}"
    ok = await run_check(
        HttpCheck(url=f"{base}/ok", json_field="status", json_value="ready"), client=client, timeout_s=2
    )
    assert ok.ok and ok.error is None and 0 < ok.latency_s < 2
    nested = await run_check(
        HttpCheck(url=f"{base}/ok", json_field="nested.n", json_value=3), client=client, timeout_s=2
    )
    assert nested.ok
    wrong = await run_check(
        HttpCheck(url=f"{base}/ok", json_field="status", json_value="notready"), client=client, timeout_s=2
    )
    assert not wrong.ok and "'ready'" in wrong.error
    bad = await run_check(HttpCheck(url=f"{base}/other"), client=client, timeout_s=2)
    assert not bad.ok and "503" in bad.error


async def test_refused_and_tcp(stranger: int, client: httpx.AsyncClient) -> None:
    closed = free_port_base(1)
    refused = await run_check(HttpCheck(url=f"http://127.0.0.1:{closed}/health"), client=client, timeout_s=1)
    assert not refused.ok and refused.error == "connection refused"
    assert (await run_check(TcpCheck(host="127.0.0.1", port=stranger), client=client, timeout_s=1)).ok
    tcp_refused = await run_check(TcpCheck(host="127.0.0.1", port=closed), client=client, timeout_s=1)
    assert not tcp_refused.ok and "refused" in tcp_refused.error


async def test_exec_status_and_timeout(client: httpx.AsyncClient) -> None:
    assert (await run_check(ExecCheck(argv=("true",)), client=client, timeout_s=2)).ok
    failed = await run_check(ExecCheck(argv=("false",)), client=client, timeout_s=2)
    assert not failed.ok and "exited with 1" in failed.error
    slow = await run_check(
        ExecCheck(argv=(sys.executable, "-c", "import time; time.sleep(30)")), client=client, timeout_s=0.3
    )
    assert not slow.ok and "did not finish" in slow.error and slow.latency_s < 5
    missing = await run_check(ExecCheck(argv=("/nonexistent/probe",)), client=client, timeout_s=1)
    assert not missing.ok


async def test_port_held_by_a_stranger_is_not_trusted(stranger: int, client: httpx.AsyncClient) -> None:
    child = subprocess.Popen([sys.executable, FIXTURE_CHILD], stdout=subprocess.DEVNULL)
    try:
        check = HttpCheck(url=f"http://127.0.0.1:{stranger}/ok", owned_port=stranger)
        result = await run_check(check, client=client, timeout_s=2, owner_pid=child.pid)
        assert not result.ok
        assert f"port {stranger}" in result.error and f"pid {child.pid}" in result.error
    finally:
        child.kill()
        child.wait()


async def test_port_owned_by_the_child_is_trusted(client: httpx.AsyncClient) -> None:
    port = free_port_base(1)
    child = subprocess.Popen([sys.executable, FIXTURE_CHILD, "--port", str(port)], stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: _listening(port), 10, what="fixture child listening")
        check = HttpCheck(url=f"http://127.0.0.1:{port}/health", owned_port=port)
        result = await run_check(check, client=client, timeout_s=2, owner_pid=child.pid)
        assert result.ok, result.error
        assert port_owned_by_tree(port, child.pid) == (True, None)
    finally:
        child.kill()
        child.wait()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_tally_applies_kubernetes_thresholds() -> None:
    probe = Probe(check=TcpCheck(host="h", port=1), failure_threshold=3, success_threshold=2)
    tally = Tally()
    tally = tally.observe(True, probe)
    assert not tally.passing  # one success of two needed
    tally = tally.observe(True, probe)
    assert tally.passing
    for _ in range(2):
        tally = tally.observe(False, probe)
    assert tally.passing and tally.failures == 2  # not yet past the failure threshold
    tally = tally.observe(False, probe)
    assert not tally.passing and tally.failures == 3


def test_worker_counts_from_the_model_ready_answer() -> None:
    from supervisor.engine.probes import worker_counts

    payload = {
        "model": "demo",
        "ready": True,
        "namespaces": {
            "dynamo": {
                "worker_types": {"decode": {"workers": 2, "needs": [["prefill"]]}, "prefill": {"workers": 1}}
            }
        },
    }
    assert worker_counts(payload) == {"decode": 2, "prefill": 1}
    assert worker_counts({"ready": False}) == {} and worker_counts([]) == {}
