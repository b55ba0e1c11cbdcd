"""Security with the real demo: what listens where, no secret in the supervisor's output, and a
state directory planted by another user refused before anything starts."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from pathlib import Path

import psutil
import pytest
from conftest import marked
from harness import CLI, NAMES, Deployment

pytestmark = pytest.mark.e2e
SECRET = "hunter2"
# Dynamo 1.6.1 binds these to all interfaces whatever the environment says (README, "Known limits"):
# per mocker worker, its event-plane ZMQ publishers on random ports. (The mocker's bootstrap server,
# another one, is not started: the supervisor leaves its rendezvous off.)
ZMQ_PUBLISHERS_PER_WORKER = 3


def _ephemeral() -> range:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return range(low, high + 1)


def _listeners(pid: int) -> list[tuple[str, int]]:
    conns = psutil.Process(pid).net_connections(kind="inet")
    return sorted({(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN})


def _loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip.split("%")[0]).is_loopback


def test_listeners_are_loopback_but_for_dynamos_documented_ones(tmp_path: Path) -> None:
    with Deployment(tmp_path) as dep:
        dep.wait_ready()
        pids = {name: dep.process_state(name)[1] for name in NAMES}
        everyone = dep.tree()
        seen = {pid: _listeners(pid) for pid in everyone}
        assert dep.stop() == 0
    # Every port the supervisor configures listens on loopback, in the process it belongs to.
    configured = {"frontend": dep.base, "decode": dep.base + 81, "prefill": dep.base + 82}
    for name, port in configured.items():
        assert ("127.0.0.1", port) in seen[pids[name]], (name, seen[pids[name]])
    workers = {pids["decode"], pids["prefill"]}
    unexplained, zmq = [], {pid: 0 for pid in workers}
    for pid, listeners in seen.items():
        for ip, port in listeners:
            if _loopback(ip):
                continue
            if pid in workers and port in _ephemeral():
                zmq[pid] += 1
                continue
            unexplained.append((psutil.Process(pid).name() if psutil.pid_exists(pid) else pid, ip, port))
    assert not unexplained, f"non-loopback listeners nobody documented: {unexplained}"
    # Exactly Dynamo's publishers: one more all-interfaces socket per worker would fail here.
    assert list(zmq.values()) == [ZMQ_PUBLISHERS_PER_WORKER] * 2, zmq
    assert all(_loopback(ip) for ip, _ in seen[dep.pid]), seen[dep.pid]  # the supervisor itself
    assert all(_loopback(ip) for ip, _ in seen[pids["frontend"]]), seen[pids["frontend"]]


def test_no_secret_reaches_the_supervisors_output(tmp_path: Path) -> None:
    """Secrets in the profile (remote URL, env) never appear in what the supervisor prints or logs,
    through start, a crash and restart, and shutdown (the children's own logs are theirs)."""
    secrets = (
        "--set",
        f'lmcache.remote.url="redis://:{SECRET}@127.0.0.1:1"',
        "--set",
        f'env.HF_TOKEN="{SECRET}-token"',
        "--set",
        f'workers.decode.env.CACHE_PASSWORD="{SECRET}"',
    )
    with Deployment(tmp_path, extra=secrets, echo_children=True) as dep:
        dep.wait_ready()
        old = dep.process_state("decode")[1]
        os.kill(old, 9)
        dep.wait(lambda: dep.process_state("decode")[1] != old and dep.all_ready(), 60, "decode back, ready")
        assert dep.stop() == 0
    output = dep.stdout + dep.stderr
    assert dep.named("process backoff", "decode")  # the crash really went through the logs
    assert SECRET not in output
    # The plan view and preflight mask the same URL (a vLLM profile probes the remote cache).
    env = {**dep.env}
    for argv in (
        [CLI, "plan", "demo", *secrets, "--json"],
        [CLI, "check", "agg", *secrets[:4], "--json"],
        [CLI, "check", "agg", *secrets[:4]],
    ):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode in (0, 3), done.stderr
        assert SECRET not in done.stdout + done.stderr
        if "--json" in argv:  # the table wraps long messages wherever its column widths fall
            assert "redis://:***@127.0.0.1:1" in done.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a directory to another user")
def test_up_refuses_a_state_dir_of_another_user(tmp_path: Path, no_leaked_processes: str) -> None:
    planted = tmp_path / "state" / "demo"
    planted.mkdir(parents=True)
    os.chown(planted, 65534, 65534)
    env = {**os.environ, "LMCACHE_SUPERVISE_STATE_ROOT": str(tmp_path / "state")}
    done = subprocess.run(
        [CLI, "up", "demo", "--set", "ports.base=24000", "--quiet-children"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"lmcache-supervise: state directory {planted}: is owned by uid 65534, not by this user (uid 0); "
        "refusing to use it: remove it or run as its owner"
    )
    assert list(planted.iterdir()) == []  # no pid file, no logs, no discovery entries
    assert not marked(no_leaked_processes)  # and no process started
