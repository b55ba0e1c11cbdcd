"""Two Dynamo frontends behind HAProxy, as docs/reliability.md tells an operator to run them, measured.

    .venv/bin/python scripts/frontends_lb.py [--restarts 3] [--kills 1] [--min-requests 400] [--json]

``up demo-ha`` (two decode and two prefill mocker replicas, migration on) with its frontend, a
second frontend started beside it exactly as the docs say (the env and argv ``plan --json`` gives
the first, on another port), and HAProxy (the Debian package; ``scripts/system-deps.sh``) in front
of both with the documented backend: an active ``GET /health`` check and ``retry-on`` for refused
connections and 503s. Streaming clients (``streamload``: a non-200, an error event or a stream
without a finish reason is a failure) go through HAProxy while the supervised frontend is
restarted (``restart frontend --allow-downtime``: SIGTERM, Dynamo's drain, a new process) and
then SIGKILLed. Prints the requests and failures of each phase; exit status 0 when the restarts
failed none.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from harness import CLI, MARKER, Deployment
from proctools import free_port, wait_for
from streamload import Outcome, StreamLoad, summary

ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CONFIG = """\
global
    maxconn 256
defaults
    mode http
    timeout connect 1s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch 1
    option http-buffer-request
frontend api
    bind 127.0.0.1:{lb_port}
    default_backend dynamo
backend dynamo
    balance roundrobin
    option httpchk GET /v1/models/demo/ready
    retry-on conn-failure empty-response 503
    server fe1 127.0.0.1:{fe1_port} check inter 1s fall 1 rise 2
    server fe2 127.0.0.1:{fe2_port} check inter 1s fall 1 rise 2
"""


def _answers(url: str) -> bool:
    try:
        with httpx.Client(trust_env=False) as client:
            return client.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _chat_ok(url: str) -> bool:
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        with httpx.Client(trust_env=False) as client:
            return client.post(f"{url}/v1/chat/completions", json=body, timeout=10.0).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def _process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def second_frontend_argv(dep: Deployment, port: int) -> tuple[list[str], dict[str, str]]:
    """The supervised frontend's argv and env from ``plan --json``, on ``port``: what the docs say."""
    done = subprocess.run(
        [CLI, "plan", dep.profile, "--set", f"ports.base={dep.base}", "--json"],
        env=dep.env,
        capture_output=True,
        text=True,
        check=True,
    )
    frontend = next(p for p in json.loads(done.stdout)["processes"] if p["role"] == "frontend")
    argv = list(frontend["argv"])
    argv[argv.index("--http-port") + 1] = str(port)
    return argv, {**dep.env, **frontend["env"]}


def _kill_frontend(dep: Deployment) -> None:
    """SIGKILL the supervised frontend; return once its next incarnation runs."""
    _, pid = dep.process_state("frontend")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    dep.wait(
        lambda: dep.process_state("frontend")[0] == "running" and dep.process_state("frontend")[1] != pid,
        60,
        "the frontend running again",
    )


def _phase(load: StreamLoad, action: Any) -> tuple[list[Outcome], Any]:
    start = time.monotonic()
    result = action()
    time.sleep(2.0)  # fixed tail: requests sent right after the action must pass too
    end = time.monotonic()
    return [o for o in load.outcomes() if o.started < end and o.ended >= start], result  # in flight too


def run(workdir: Path, *, restarts: int, kills: int, clients: int, min_requests: int) -> dict[str, Any]:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise SystemExit("frontends_lb: no haproxy (scripts/system-deps.sh installs it)")
    profile = workdir / "lb.toml"
    profile.write_text(f'extends = "{ROOT / "profiles" / "demo-ha.toml"}"\nname = "lb"\n')
    names = ("frontend", "decode-0", "decode-1", "prefill-0", "prefill-1")
    with Deployment(workdir / "up", profile=str(profile), name="lb", names=names) as dep:
        dep.wait_ready()
        fe2_port, lb_port = free_port(), free_port()
        argv, env = second_frontend_argv(dep, fe2_port)
        config = workdir / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(lb_port=lb_port, fe1_port=dep.base, fe2_port=fe2_port))
        lb_env = {**os.environ, MARKER: dep.marker}
        with (
            _process(argv, env, workdir / "frontend-2.log"),
            _process([haproxy, "-f", str(config), "-db"], lb_env, workdir / "haproxy.log"),
        ):
            wait_for(
                lambda: _answers(f"http://127.0.0.1:{fe2_port}/v1/models/demo/ready"),
                60,
                interval=0.1,
                what="frontend 2",
            )
            wait_for(lambda: _answers(f"http://127.0.0.1:{lb_port}/health"), 30, interval=0.1, what="HAProxy")
            for port in (dep.base, fe2_port, lb_port):  # set-up, not measured: each answers a chat
                url = f"http://127.0.0.1:{port}"
                wait_for(lambda: _chat_ok(url), 30, interval=0.1, what=f"a chat answered on {url}")  # noqa: B023
            load = StreamLoad(f"http://127.0.0.1:{lb_port}", model="demo", clients=clients)
            load.start()
            try:
                phases: dict[str, list[Outcome]] = {}
                for i in range(restarts):
                    phases[f"restart {i + 1}"], done = _phase(
                        load,
                        lambda: subprocess.run(
                            [CLI, "restart", "frontend", "--allow-downtime", "-d", "lb"],
                            env=dep.env,
                            capture_output=True,
                            text=True,
                            timeout=120,
                        ),
                    )
                    if done.returncode != 0:
                        raise RuntimeError(f"restart frontend failed: {done.stderr.strip()}")
                for i in range(kills):
                    phases[f"sigkill {i + 1}"], _ = _phase(load, lambda: _kill_frontend(dep))
                wait_for(
                    lambda: len(load.outcomes()) >= min_requests,
                    300,
                    interval=0.1,
                    what=f"{min_requests} requests",
                )
            finally:
                outcomes = load.stop()
    restarted = [o for name, got in phases.items() if name.startswith("restart") for o in got]
    t0 = outcomes[0].started if outcomes else 0.0
    failures = [(round(o.started - t0, 2), o.error) for o in outcomes if not o.ok]
    return {
        "requests": len(outcomes),
        "failed": sum(not o.ok for o in outcomes),
        "restarts": {"requests": len(restarted), "failed": sum(not o.ok for o in restarted)},
        "phases": {name: summary(got) for name, got in phases.items()},
        "failures": failures[:20],  # seconds after the first request, and why
        "clients": clients,
        "haproxy": subprocess.run([haproxy, "-v"], capture_output=True, text=True).stdout.split("\n")[0],
        "ok": all(o.ok for o in restarted),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=3, help="restarts of the supervised frontend")
    parser.add_argument("--kills", type=int, default=1, help="SIGKILLs of it afterwards")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--min-requests", type=int, default=400)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, state)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="lmcs-lb-"))
    try:
        figures = run(
            workdir,
            restarts=args.restarts,
            kills=args.kills,
            clients=args.clients,
            min_requests=args.min_requests,
        )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"two frontends behind {figures['haproxy']}, {figures['clients']} streaming clients")
        print(f"  all: {figures['failed']} failed of {figures['requests']}")
        for name, got in figures["phases"].items():
            print(f"  {name}: {got}")
        for at, why in figures["failures"]:
            print(f"  failed at {at} s: {why}")
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
