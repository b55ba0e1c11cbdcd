"""LMCache's own servers under a real ``up``: the multiprocess ``lmcache server``, ``lmcache_server``
(lm://) and ``redis-server``, each beside a real Dynamo frontend and mocker worker on the CPU.

For each: started before the worker that depends on it and only once its probe passed; SIGKILLed,
restarted by the supervisor; its dependents handled as designed (docs/lmcache-servers.md): the
multiprocess server and Redis restart alone, lm:// restarts its worker too; nothing left after stop.

The servers come from .venv-lmcache (``make lmcache-venv``, which ``make test`` runs) and Debian's
redis-server (``make system-deps``); a missing one fails the test, it is never skipped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import redis
from conftest import wait_for
from harness import Deployment
from proctools import free_port

pytestmark = pytest.mark.e2e

LMCACHE_BIN = Path(__file__).resolve().parents[2] / ".venv-lmcache" / "bin"
# One lookup through LMCache's own client class (what vLLM's LMCacheMPConnector builds in the scheduler).
LOOKUP = """
import os, sys, time, zmq
from lmcache.integration.vllm.vllm_multi_process_adapter import LMCacheMPSchedulerAdapter, ParallelStrategy
strategy = ParallelStrategy(mla_only=False, vllm_world_size=1, vllm_worker_id=0, tp_size=1, pp_size=1, n_servers=1)
adapter = LMCacheMPSchedulerAdapter([sys.argv[1]], zmq.Context.instance(), "demo", 16, strategy, mq_timeout=30)
adapter.maybe_submit_lookup_request("r1", list(range(512)))
deadline = time.monotonic() + 30
while (hit := adapter.check_lookup_result("r1")) is None and time.monotonic() < deadline:
    time.sleep(0.01)
print(hit, flush=True)
os._exit(0 if hit is not None else 1)
"""


@pytest.fixture(scope="module")
def lmcache_path() -> str:
    """PATH with .venv-lmcache/bin first, where ``lmcache`` and ``lmcache_server`` live."""
    for name in ("lmcache", "lmcache_server"):
        assert (LMCACHE_BIN / name).exists(), f"{LMCACHE_BIN / name} is missing: run `make lmcache-venv`"
    return f"{LMCACHE_BIN}{os.pathsep}{os.environ.get('PATH', '')}"


def status(up: Deployment) -> dict:
    done = up.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def procs(up: Deployment) -> dict[str, dict]:
    return {p["name"]: p for p in status(up)["processes"]}


def event_index(up: Deployment, event: str, process: str) -> int:
    events = up.event_data()
    return next(i for i, e in enumerate(events) if e.get("event") == event and e.get("process") == process)


def assert_gated(up: Deployment, server: str, dependent: str) -> None:
    """``dependent`` was spawned only after ``server`` passed its probe."""
    assert event_index(up, "process running", server) < event_index(up, "process starting", dependent)


def kill_and_wait_back(up: Deployment, name: str, timeout: float = 180) -> dict[str, dict]:
    before = procs(up)[name]
    os.kill(before["pid"], signal.SIGKILL)

    def back() -> dict[str, dict] | None:
        now = procs(up)
        p = now[name]
        healthy = all(q["state"] == "healthy" for q in now.values())
        return now if p["pid"] != before["pid"] and p["restarts"] >= 1 and healthy else None

    return wait_for(back, timeout, interval=0.2, what=f"{name} restarted and every process healthy")


def test_demo_lmcache_multiprocess_server(tmp_path: Path, lmcache_path: str) -> None:
    up = Deployment(tmp_path, profile="demo-lmcache", env={"PATH": lmcache_path}, fast_stop=False).start()
    try:
        up.wait_ready(timeout_s=180)
        now = procs(up)
        assert list(now) == ["lmcache-server", "frontend", "worker"]
        assert now["lmcache-server"]["ports"] == {"http": up.base + 556, "zmq": up.base + 555}
        assert_gated(up, "lmcache-server", "worker")

        # status: the server's health and its L1, from its own /metrics
        cache = status(up)["cache_servers"]
        assert [c["process"] for c in cache] == ["lmcache-server"]
        assert cache[0]["healthy"] and cache[0]["metrics_error"] is None
        assert cache[0]["capacity_bytes"] == int(0.5 * 2**30) and cache[0]["l1_used_bytes"] == 0.0
        table = up.cli("status")
        assert table.returncode == 0 and "L1 0.00 GiB of 0.50 GiB" in table.stdout, table.stdout

        # a real lookup through LMCache's client, then metrics: the server is a scrape target, its L1 and
        # lookup counters read
        looked = subprocess.run(
            [str(LMCACHE_BIN / "python"), "-c", LOOKUP, f"tcp://127.0.0.1:{up.base + 555}"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**up.env, "PYTHONWARNINGS": "ignore"},
            check=False,
        )
        assert looked.returncode == 0 and looked.stdout.strip() == "0", looked.stderr[-2000:]
        targets = json.loads((up.state_dir / "targets.json").read_text())
        assert f"127.0.0.1:{up.base + 556}" in [t for e in targets for t in e["targets"]]
        done = up.cli("metrics", "--json")
        assert done.returncode == 0, done.stderr
        server = next(e for e in json.loads(done.stdout)["endpoints"] if e["process"] == "lmcache-server")
        assert server["error"] is None and server["l1_usage_ratio"] == 0.0
        assert server["lmcache_hit_tokens"] == 0.0 and server["lmcache_requested_tokens"] is not None

        # SIGKILL: the server comes back; the worker is left alone (LMCache's MP client reconnects)
        worker_pid = now["worker"]["pid"]
        after = kill_and_wait_back(up, "lmcache-server")
        assert after["worker"]["pid"] == worker_pid and after["worker"]["restarts"] == 0
        assert up.chat().status_code == 200

        # down: every process stops (the harness then finds nothing left with this run's marker)
        done = up.cli("down")
        assert done.returncode == 0, done.stderr
        assert up.proc.wait(timeout=60) == 0
        assert not (up.state_dir / "control.sock").exists()
    finally:
        up.stop_clean()


def test_served_lm_server_restarts_its_worker(tmp_path: Path, lmcache_path: str) -> None:
    port = free_port()
    served = f'lmcache.remote={{url="lm://127.0.0.1:{port}", serve=true}}'
    up = Deployment(
        tmp_path, profile="demo-agg", extra=["--set", served], env={"PATH": lmcache_path}, fast_stop=False
    ).start()
    try:
        up.wait_ready(timeout_s=180)
        now = procs(up)
        assert list(now) == ["lm-server", "frontend", "worker"] and now["lm-server"]["ports"] == {
            "port": port
        }
        assert now["lm-server"]["probe"]["ok"]
        assert_gated(up, "lm-server", "worker")
        # SIGKILL: lm:// clients keep a dead socket (docs/lmcache-servers.md), so the worker restarts too,
        # once the new server answers HEALTH again.
        worker_pid = now["worker"]["pid"]
        after = kill_and_wait_back(up, "lm-server")
        assert after["worker"]["pid"] != worker_pid and after["worker"]["restarts"] >= 1
        assert event_index(up, "process running", "lm-server") < len(up.event_data())
    finally:
        up.stop_clean()


def test_served_redis_bounded_loopback_and_restarted_alone(tmp_path: Path) -> None:
    port = free_port()
    served = f'lmcache.remote={{url="redis://127.0.0.1:{port}", serve=true, server={{maxmemory_gb=0.0625}}}}'
    up = Deployment(tmp_path, profile="demo-agg", extra=["--set", served], fast_stop=False).start()
    try:
        up.wait_ready(timeout_s=120)
        now = procs(up)
        assert list(now) == ["redis", "frontend", "worker"]
        assert_gated(up, "redis", "worker")
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        config = client.config_get("*")
        assert config["bind"] == "127.0.0.1" and config["maxmemory"] == str(64 * 2**20)
        assert config["maxmemory-policy"] == "allkeys-lru" and config["appendonly"] == "no"
        assert config["save"] == ""
        # SIGKILL: Redis comes back; the worker is left alone (redis-py reconnects by itself)
        worker_pid = now["worker"]["pid"]
        after = kill_and_wait_back(up, "redis", timeout=60)
        assert after["worker"]["pid"] == worker_pid and after["worker"]["restarts"] == 0
        assert client.ping()
        client.close()
    finally:
        up.stop_clean()
