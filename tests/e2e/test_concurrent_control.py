"""The reported crash, against a real `up demo`: `stop decode &` and at once `restart decode`.

Before the per-process operation lock this ended the supervisor (StateError: cannot go from
stopping to starting) and with it every process. Now the restart waits for the stop and then
starts decode; repeated, the deployment is left running, ready, and answering requests.
"""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest
from harness import CLI, Deployment

pytestmark = pytest.mark.e2e
ROUNDS = 5


def _status(up: Deployment) -> dict:
    done = up.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _state(up: Deployment, name: str) -> str:
    return next(p["state"] for p in _status(up)["processes"] if p["name"] == name)


def test_stop_and_restart_at_once_repeated_leave_the_demo_running_and_healthy(tmp_path) -> None:
    # decode's drain is cut to 1 s (SIGKILL after it): the restart still lands inside it.
    with Deployment(tmp_path / "demo", extra=("--set", "workers.decode.stop_timeout_s=1")) as up:
        up.wait_ready()
        supervisor = up.pid
        for round_ in range(ROUNDS):
            old = {p["name"]: p["pid"] for p in _status(up)["processes"]}
            stop = subprocess.Popen(
                [CLI, "stop", "decode"], env=up.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            # The stop reaches the supervisor first (two CLIs started together may arrive in either
            # order; a restart followed by a stop rightly ends stopped), then the restart comes from
            # "at once" to well inside decode's drain.
            up.wait(
                lambda proc=stop: _state(up, "decode") == "stopping" or proc.poll() is not None,
                30,
                "decode stopping",
            )
            time.sleep(0.1 * round_)
            restart = up.cli("restart", "decode", "--allow-downtime", timeout=120)
            out, err = stop.communicate(timeout=120)
            assert stop.returncode == 0, err
            assert restart.returncode == 0, restart.stderr
            assert up.running() and up.pid == supervisor, "the supervisor must survive"
            up.wait(
                lambda: _status(up)["deployment"]["state"] == "ready",
                60,
                f"the deployment ready again after round {round_}",
            )
            doc = _status(up)
            procs = {p["name"]: p for p in doc["processes"]}
            assert all(p["state"] == "healthy" for p in procs.values()), procs
            assert procs["decode"]["pid"] != old["decode"]
            assert procs["frontend"]["pid"] == old["frontend"] and procs["prefill"]["pid"] == old["prefill"]
        with httpx.Client(trust_env=False, timeout=30) as client:
            reply = client.post(
                f"{up.url}/v1/chat/completions",
                json={"model": "demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
            )
        assert reply.status_code == 200, reply.text
        assert up.stop() == 0
