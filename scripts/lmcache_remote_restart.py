"""What LMCache 0.5.6's remote connectors do when their server (``lmcache_server`` or ``redis-server``) restarts.

The evidence behind docs/lmcache-servers.md ("When the server restarts"), beside
scripts/lmcache_client_restart.py (the multiprocess server). It drives LMCache's OWN connector classes,
``LMCServerConnector`` (``lm://``) and ``RedisConnector`` (``redis://``), the ones a worker's
``RemoteBackend`` builds from ``remote_url``, against real servers on loopback:

1. start the server, build the connector, ``exists(key)`` answers (False: nothing stored);
2. SIGKILL the server and start a new one on the same port (health-checked);
3. ``exists(key)`` again: does the SAME connector object work against the new server?

Run with the interpreter that has lmcache (``make lmcache-venv``):
    .venv-lmcache/bin/python scripts/lmcache_remote_restart.py [--json]
Needs ``redis-server`` on PATH for the Redis half (``scripts/system-deps.sh`` installs it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from proctools import free_port


def wait_port(port: int, timeout_s: float = 60) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return time.monotonic() - start
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port} after {timeout_s:g} s")


def start(kind: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    if kind == "lm":
        binary = shutil.which("lmcache_server", path=str(Path(sys.executable).parent)) or "lmcache_server"
        argv = [binary, "127.0.0.1", str(port)]
    else:
        argv = [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
        ]
    env = {
        **os.environ,
        "LMCACHE_DISABLE_BANNER": "1",
        "LMCACHE_TRACK_USAGE": "false",
        "PYTHONWARNINGS": "ignore",
    }
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        proc.wait()


def connector(kind: str, port: int, loop: asyncio.AbstractEventLoop) -> Any:
    import torch
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata

    config = LMCacheEngineConfig.from_defaults(chunk_size=256)
    metadata = LMCacheMetadata(
        model_name="demo",
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=torch.float16,
        kv_shape=(2, 2, 256, 2, 64),
    )
    # The connectors read only .config and .metadata of the local CPU backend at construction.
    backend = SimpleNamespace(config=config, metadata=metadata)
    if kind == "lm":
        from lmcache.v1.storage_backend.connector.lm_connector import LMCServerConnector

        return LMCServerConnector("127.0.0.1", port, loop, backend)
    from lmcache.v1.storage_backend.connector.redis_connector import RedisConnector

    return RedisConnector(f"redis://127.0.0.1:{port}", loop, backend)


def exists(conn: Any, loop: asyncio.AbstractEventLoop) -> str:
    """``exists(key)`` as the worker's RemoteBackend calls it: 'False'/'True', or the error it raised."""
    import torch
    from lmcache.utils import CacheEngineKey

    key = CacheEngineKey("demo", 1, 0, 12345, torch.float16)
    try:
        return str(asyncio.run_coroutine_threadsafe(conn.exists(key), loop).result(timeout=10))
    except Exception as exc:  # noqa: BLE001 - the point is to see what the worker would see
        return f"error: {type(exc).__name__}: {exc}"


def trial(kind: str, tmp: Path) -> dict[str, Any]:
    port = free_port()
    log = tmp / f"{kind}.log"
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server = start(kind, port, log)
    out: dict[str, Any] = {}
    try:
        out["ready_s"] = round(wait_port(port), 2)
        conn = connector(kind, port, loop)
        out["before"] = exists(conn, loop)
        kill(server)
        out["while_down"] = exists(conn, loop)
        server = start(kind, port, log)
        out["restarted_ready_s"] = round(wait_port(port), 2)
        out["after_restart_first"] = exists(conn, loop)
        out["after_restart_second"] = exists(conn, loop)
        out["recovered"] = out["after_restart_second"] in ("True", "False")
    finally:
        kill(server, signal.SIGTERM)
        loop.call_soon_threadsafe(loop.stop)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", choices=("lm", "redis"))
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lmc-remote-") as tmp:
        for kind in ("lm", "redis"):
            if args.only and kind != args.only:
                continue
            if kind == "redis" and not shutil.which("redis-server"):
                results[kind] = {"skipped": "redis-server not on PATH"}
                continue
            results[kind] = trial(kind, Path(tmp))
            r = results[kind]
            print(
                f"{kind}://: before {r['before']}; server down: {r['while_down']}; after the restart: "
                f"{r['after_restart_first']}, then {r['after_restart_second']} -> "
                f"{'recovers by itself' if r['recovered'] else 'stays broken until the worker restarts'}"
            )
    if args.json:
        print(json.dumps(results, sort_keys=True))
    sys.stdout.flush()
    # Leave at once: the connectors' executor tasks would complain about their closed loops.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
