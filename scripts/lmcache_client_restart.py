"""What an LMCache 0.5.6 multiprocess client does when its `lmcache server` is SIGKILLed and restarted.

The evidence behind docs/lmcache-servers.md ("When the server restarts"). It drives LMCache's OWN
client class, ``LMCacheMPSchedulerAdapter`` (what vLLM's ``LMCacheMPConnector`` builds in the
scheduler process), against a real ``lmcache server`` on this machine's CPU:

1. start the server, wait for ``/healthcheck``, build the adapter, run one lookup (the round trip works);
2. SIGKILL the server; keep submitting lookups and time how long until the adapter reports unhealthy
   (``is_healthy`` False: LMCache's "degraded mode", in which lookups return 0 hits at once);
3. start a new server on the same port; time how long until the adapter is healthy again by itself
   and a lookup completes against the new server.

Run with the interpreter that has lmcache (``make lmcache-venv``):
    .venv-lmcache/bin/python scripts/lmcache_client_restart.py [--heartbeat 1.0] [--json]
It prints one line per phase and, with ``--json``, the measured figures as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from proctools import free_port


def wait(predicate: Callable[[], bool], *, timeout_s: float, what: str, period_s: float = 0.05) -> float:
    """Seconds until ``predicate()`` holds; raises after ``timeout_s``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s")
        time.sleep(period_s)
    return time.monotonic() - start


def healthy(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthcheck", timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


def lookups_seen(http_port: int) -> int:
    """The server's own count of completed lookups (its /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=2) as reply:
        text = reply.read().decode()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("lmcache_mp_lookups_requests_total")
        )
    )


def start_server(port: int, http_port: int, log: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("lmcache", path=str(Path(sys.executable).parent)) or "lmcache"
    env = {
        **os.environ,
        "LMCACHE_DISABLE_BANNER": "1",
        "LMCACHE_TRACK_USAGE": "false",
        "PYTHONWARNINGS": "ignore",
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                binary,
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--http-port",
                str(http_port),
                "--l1-size-gb",
                "0.25",
                "--eviction-policy",
                "LRU",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def lookup(adapter: object, request_id: str, tokens: list[int], timeout_s: float) -> int:
    """Submit a lookup and poll it to its end, as vLLM's scheduler does once per step."""
    adapter.maybe_submit_lookup_request(request_id, tokens)  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout_s
    while True:
        result = adapter.check_lookup_result(request_id)  # type: ignore[attr-defined]
        if result is not None:
            adapter.cleanup_lookup_result(request_id)  # type: ignore[attr-defined]
            return int(result)
        if time.monotonic() > deadline:
            raise TimeoutError(f"lookup {request_id} did not finish within {timeout_s:g} s")
        time.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=10.0,
        help="lmcache.mp.heartbeat_interval (LMCache's default: 10 s)",
    )
    parser.add_argument(
        "--mq-timeout", type=float, default=30.0, help="lmcache.mp.mq_timeout (default 300 s)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import zmq
    from lmcache.integration.vllm.vllm_multi_process_adapter import (
        LMCacheMPSchedulerAdapter,
        ParallelStrategy,
    )

    port, http_port = free_port(), free_port()
    url = f"tcp://127.0.0.1:{port}"
    figures: dict[str, float | int | bool | str] = {"heartbeat_interval_s": args.heartbeat}
    tokens = list(range(1024))
    with tempfile.TemporaryDirectory(prefix="lmc-restart-") as tmp:
        log = Path(tmp) / "server.log"
        server = start_server(port, http_port, log)
        try:
            figures["server_ready_s"] = round(
                wait(lambda: healthy(http_port), timeout_s=120, what="server"), 2
            )
            print(f"server healthy after {figures['server_ready_s']} s (pid {server.pid})")
            strategy = ParallelStrategy(
                mla_only=False, vllm_world_size=1, vllm_worker_id=0, tp_size=1, pp_size=1, n_servers=1
            )
            adapter = LMCacheMPSchedulerAdapter(
                [url],
                zmq.Context.instance(),
                "demo",
                16,
                strategy,
                extra_config={
                    "lmcache.mp.heartbeat_interval": args.heartbeat,
                    "lmcache.mp.mq_timeout": args.mq_timeout,
                },
            )
            figures["first_lookup_hit_tokens"] = lookup(adapter, "before", tokens, 10)
            print(
                f"lookup before the kill: {figures['first_lookup_hit_tokens']} hit tokens, healthy={adapter.is_healthy}"
            )

            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            killed_at = time.monotonic()
            print("server SIGKILLed")
            # vLLM keeps scheduling: a lookup per step. Each must return (0 hits), never hang.
            slowest = 0.0
            n = 0
            while adapter.is_healthy and time.monotonic() - killed_at < 3 * args.heartbeat + 10:
                t0 = time.monotonic()
                try:
                    lookup(adapter, f"down-{n}", tokens, args.mq_timeout + 5)
                except TimeoutError:
                    pass
                slowest = max(slowest, time.monotonic() - t0)
                n += 1
            figures["unhealthy_after_s"] = round(time.monotonic() - killed_at, 2)
            figures["slowest_lookup_while_down_s"] = round(slowest, 3)
            figures["degraded"] = not adapter.is_healthy
            t0 = time.monotonic()
            figures["lookup_while_down_hit_tokens"] = lookup(adapter, "down-final", tokens, 1)
            figures["lookup_while_down_s"] = round(time.monotonic() - t0, 4)
            print(
                f"adapter unhealthy {figures['unhealthy_after_s']} s after the kill (degraded mode); a lookup "
                f"then returns {figures['lookup_while_down_hit_tokens']} in {figures['lookup_while_down_s']} s"
            )

            server = start_server(port, http_port, log)
            restarted_at = time.monotonic()
            figures["restarted_server_ready_s"] = round(
                wait(lambda: healthy(http_port), timeout_s=120, what="restart"), 2
            )
            figures["client_recovered_s"] = round(
                wait(lambda: adapter.is_healthy, timeout_s=3 * args.heartbeat + 30, what="client recovery"), 2
            )
            figures["client_recovered_after_restart_s"] = round(time.monotonic() - restarted_at, 2)
            figures["lookup_after_restart_hit_tokens"] = lookup(adapter, "after", tokens, 10)
            figures["recovered"] = adapter.is_healthy
            figures["server_lookups_counted"] = lookups_seen(http_port)
            print(
                f"new server healthy {figures['restarted_server_ready_s']} s after its start; client healthy again "
                f"{figures['client_recovered_s']} s later, with no action; lookup after: "
                f"{figures['lookup_after_restart_hit_tokens']} hit tokens"
            )
            print(
                f"the new server counted {figures['server_lookups_counted']} lookups (the lookup reached it)"
            )
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    # Leave at once: the adapter's heartbeat thread is a non-daemon PeriodicThread.
    os._exit(0 if figures.get("recovered") else 1)


if __name__ == "__main__":
    sys.exit(main())
