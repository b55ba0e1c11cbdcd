"""Service availability with the real Dynamo frontend and mocker replicas (profile demo-ha).

- SIGKILLs of decode and prefill replicas, ``restart --all`` and a reload that changes every worker, under
  four streaming clients: the rolling operations cost no request (one replica of each role keeps
  serving) and migration moves the requests in flight on a killed replica. The same run measures a frontend restart, so
  the client is shown to see an outage when there is one.
- SIGKILLs of prefill replicas while requests sit in their prefill stage on them: Dynamo moves each
  such request to the other prefill replica (the mocker runs the synchronous KV handoff vLLM uses;
  with its bootstrap rendezvous these requests, and everything for seconds after, failed with 503).
- A replica whose command exits at once crash-loops, is FAILED and waits out its long retry while
  the other replicas serve: requests keep succeeding and ``up`` keeps running.
The long version with a thousand requests and ten SIGKILLs is ``scripts/soak.py --ha``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import harness
import pytest
from conftest import wait_for
from harness import Deployment
from soakkit import ha
from streamload import StreamLoad, summary

pytestmark = pytest.mark.e2e
PROFILES = Path(__file__).resolve().parents[2] / "profiles"


def test_kills_rolling_restart_and_rolling_reload_cost_no_request(tmp_path: Path) -> None:
    # decode-0, prefill-0, decode-1, prefill-1 (the prefill stage is short here: the next test makes
    # sure a prefill SIGKILL catches requests in it)
    figures = ha.run_ha(tmp_path, kills=4, clients=4, min_requests=200, settle_s=1.0)
    print(json.dumps(figures, indent=2))  # shown by pytest on failure
    phases = figures["phases"]
    assert all(phases[p]["sent"] > 0 for p in ("sigkill", "restart_all", "reload")), phases
    assert figures["sent"] >= 200
    # Without migration a SIGKILL fails the requests in flight on the replica (the issue measured 6
    # failed in 3 SIGKILLs of a decode worker): at most one in four shows Dynamo moved them.
    assert phases["sigkill"]["failed"] <= 1, figures["per_kill"]
    assert phases["restart_all"]["failed"] == phases["reload"]["failed"] == phases["tail"]["failed"] == 0, (
        phases
    )
    restarted = figures["restart_all"]
    assert restarted["exit"] == 0, restarted
    assert "restarted every worker, one at a time; deployment ready" in restarted["output"]
    reloaded = figures["reload"]
    assert reloaded["exit"] == 0, reloaded
    assert "(one at a time: decode-0, decode-1, prefill-0, prefill-1)" in reloaded["output"]
    # One frontend is a single point of failure: the same client does see that outage.
    frontend = figures["frontend_restart"]
    assert frontend["exit"] == 0 and frontend["failed"] > 0 and frontend["refusal_window_s"] > 0


def test_sigkilled_prefill_replicas_cost_no_request(tmp_path: Path) -> None:
    # Prefill 20x slower than the demo's, so that every SIGKILL catches requests in their prefill
    # stage on the replica (with the demo's prefill of a few ms, most kills would hit none).
    profile = tmp_path / "ha-prefill.toml"
    profile.write_text(
        f'extends = "{PROFILES / "demo-ha.toml"}"\nname = "ha-prefill"\n'
        '[workers.prefill]\nargs = ["--speedup-ratio", "0.05"]\n'
    )
    dep = Deployment(tmp_path, profile=str(profile), name="ha-prefill", names=("frontend", *ha.HA_WORKERS))
    with dep:
        dep.wait_ready()
        with StreamLoad(dep.url, model="demo", clients=4) as load:
            assert load.wait_sent(20, 60)
            for name in ("prefill-0", "prefill-1", "prefill-0", "prefill-1"):
                ha.kill_and_recover(dep, name)
            sent = load.counts()[0]
            assert load.wait_sent(sent + 20, 60)  # traffic after the last recovery passes too
        outcomes = load.outcomes()
        frontend_log = (dep.state_dir / "logs" / "frontend.log").read_text(errors="replace")
        assert dep.stop() == 0, dep.stderr[-2000:]
    # The kills did hit requests in their prefill stage, and Dynamo moved them (migration, not luck).
    moved = [
        line for line in frontend_log.splitlines() if "dynamo_llm::migration" in line and "Prefill" in line
    ]
    assert moved, "no request was in its prefill stage on a killed replica: the test proved nothing"
    assert summary(outcomes)["failed"] == 0, summary(outcomes)


def crashing_python(script: Path, port: int) -> None:
    """The profile's interpreter, except for the worker whose DYN_SYSTEM_PORT is ``port``: that one
    exits at once with status 3 (a replica whose command is broken, e.g. its GPU is gone)."""
    script.write_text(f'#!/bin/sh\n[ "$DYN_SYSTEM_PORT" = "{port}" ] && exit 3\nexec {sys.executable} "$@"\n')
    script.chmod(0o755)


def test_a_crash_looping_replica_leaves_the_others_serving(tmp_path: Path) -> None:
    python = tmp_path / "python"
    profile = tmp_path / "ha-loop.toml"
    profile.write_text(
        f'extends = "{PROFILES / "demo-ha.toml"}"\nname = "ha-loop"\npython = "{python}"\n'
        "[workers.decode]\nrestart = { backoff_initial_s = 0.05, limit_starts = 3, failed_retry_s = 600 }\n"
    )
    base = harness.free_port_base(str(profile))
    crashing_python(python, base + 82)  # decode-1's DYN_SYSTEM_PORT
    up = Deployment(tmp_path, profile=str(profile), name="ha-loop", base=base).start()
    try:
        # No "ready:" line here: decode-1 fails before the first gate, so the deployment goes from
        # starting straight to degraded (serving, with a replica down).

        def roles() -> dict:
            done = up.cli("status", "--json")
            return {r["role"]: r for r in json.loads(done.stdout)["roles"]} if done.returncode == 0 else {}

        decode = wait_for(
            lambda: (r := roles().get("decode")) and r["failed"] and r["healthy"] == 1 and r,
            60,
            what="decode-1 failed while decode-0 serves",
        )
        assert decode == {
            "role": "decode",
            "healthy": 1,
            "replicas": 2,
            "min_ready": 1,
            "failed": ["decode-1"],
        }
        wait_for(
            lambda: json.loads(up.cli("status", "--json").stdout)["deployment"]["state"] == "degraded", 60
        )
        doc = json.loads(up.cli("status", "--json").stdout)
        failed = next(p for p in doc["processes"] if p["name"] == "decode-1")
        assert "crash loop" in failed["reason"] and "retrying in 600 s" in failed["reason"]
        with StreamLoad(up.url, model="demo", clients=4) as load:
            assert load.wait_sent(60, 60)
            time.sleep(1.0)  # a fixed second more of traffic while decode-1 stays failed
        outcomes = load.outcomes()
        assert summary(outcomes)["failed"] == 0, summary(outcomes)
        assert up.running()  # up keeps running: a contained crash loop is no reason to exit
        assert up.count("deployment failed") == 0
        assert up.stop() == 0, up.stderr[-2000:]
    finally:
        leaked = up.close()
    assert not leaked, f"processes left behind: {leaked}"
