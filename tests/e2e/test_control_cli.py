"""Every control command against a real `up demo` (Dynamo frontend + mocker decode/prefill on CPU).

One supervisor serves the module; the tests run in file order and end with `down`. Each command is
the installed CLI in a subprocess, talking to the supervisor over its control socket.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import alive, wait_for
from harness import CLI, Deployment
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e


def status(up: Deployment) -> dict:
    done = up.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def pids(up: Deployment) -> dict[str, int]:
    return {p["name"]: p["pid"] for p in status(up)["processes"]}


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    running = Deployment(tmp_path_factory.mktemp("control")).start()
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop_clean()


def test_status_table_json_and_the_private_socket(up: Deployment) -> None:
    socket_path = up.state_dir / "control.sock"
    info = os.stat(socket_path)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    doc = status(up)
    dep = doc["deployment"]
    assert doc["schema"] == 1 and dep["name"] == "demo" and dep["state"] == "ready"
    assert dep["base_url"] == f"http://127.0.0.1:{up.base}" and dep["supervisor_pid"] == up.proc.pid
    assert 0 < dep["time_to_ready_s"] < 60
    procs = {p["name"]: p for p in doc["processes"]}
    assert list(procs) == ["frontend", "decode", "prefill"]
    assert all(p["state"] == "healthy" and p["pid"] and p["probe"]["ok"] for p in procs.values())
    assert procs["decode"]["ports"] == {"system": up.base + 81} and procs["frontend"]["ports"] == {
        "http": up.base
    }
    table = up.cli("status", "--deployment", "demo")
    assert table.returncode == 0, table.stderr
    assert "demo ready" in table.stdout and "decode" in table.stdout and "healthy" in table.stdout
    watch = subprocess.Popen(
        [CLI, "status", "--json", "--watch", "--interval", "0.2"],
        env=up.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        docs = [json.loads(watch.stdout.readline()) for _ in range(2)]  # one document per refresh
        assert all(d["deployment"]["name"] == "demo" for d in docs)
    finally:
        watch.terminate()
        watch.wait(timeout=10)


def test_bad_input_and_a_missing_deployment_are_one_line(up: Deployment, tmp_path: Path) -> None:
    wrong = up.cli("restart", "nope")
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert wrong.stderr == (
        "lmcache-supervise: no process 'nope' in deployment 'demo' (processes: frontend, decode, prefill)\n"
    )
    other = up.cli("status", "--deployment", "other")
    assert other.returncode == 1 and other.stderr.count("\n") == 1 and "'other'" in other.stderr
    empty = subprocess.run(
        [CLI, "status"],
        env={**up.env, "LMCACHE_SUPERVISE_STATE_ROOT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (
        empty.returncode == 1
        and empty.stderr == f"lmcache-supervise: no running deployment under {tmp_path}\n"
    )


def test_gpus_on_a_deployment_without_gpus(up: Deployment) -> None:
    table = up.cli("gpus")
    assert table.returncode == 0 and "no GPU is watched" in table.stdout, table.stderr
    doc = up.cli("gpus", "--json")
    assert doc.returncode == 0 and json.loads(doc.stdout) == {"schema": 1, "deployment": "demo", "gpus": []}
    assert status(up)["gpus"] == []
    clear = up.cli("gpus", "clear", "0")
    assert clear.returncode == 2 and clear.stdout == ""
    assert clear.stderr == "lmcache-supervise: no GPU is watched in deployment 'demo'\n"


def test_supervisor_metrics_and_the_file_sd_targets(up: Deployment) -> None:
    dep = status(up)["deployment"]
    assert dep["metrics_url"] == f"http://127.0.0.1:{up.base + 90}/metrics"
    with httpx.Client(trust_env=False) as client:
        text = client.get(dep["metrics_url"], timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    up_series = {s.labels["process"]: s.value for s in families["lmcache_supervise_process_up"].samples}
    assert up_series == {"frontend": 1.0, "decode": 1.0, "prefill": 1.0}
    assert families["lmcache_supervise_deployment_time_to_ready_seconds"].samples[0].value > 0
    assert families["lmcache_supervise_probe_latency_seconds"].type == "histogram"
    targets = json.loads(Path(dep["targets_file"]).read_text())
    assert [(t["targets"], t["labels"]) for t in targets] == [
        (
            [f"127.0.0.1:{up.base}"],
            {"deployment": "demo", "process": "frontend", "role": "frontend", "gpu": ""},
        ),
        (
            [f"127.0.0.1:{up.base + 81}"],
            {"deployment": "demo", "process": "decode", "role": "decode", "gpu": ""},
        ),
        (
            [f"127.0.0.1:{up.base + 82}"],
            {"deployment": "demo", "process": "prefill", "role": "prefill", "gpu": ""},
        ),
    ]
    summary = up.cli("metrics", "--json")
    assert summary.returncode == 0, summary.stderr
    endpoints = {e["process"]: e for e in json.loads(summary.stdout)["endpoints"]}
    assert set(endpoints) == {"frontend", "decode", "prefill"} and not any(
        e["error"] for e in endpoints.values()
    )
    assert endpoints["frontend"]["requests"] >= 1  # the supervisor's own smoke request at least
    assert endpoints["decode"]["kv_cache_usage"] is not None  # the mocker's vllm:kv_cache_usage_perc
    assert endpoints["decode"]["lmcache_hit_tokens"] is None  # mocker: no LMCache series, and not faked
    table = up.cli("metrics")
    assert table.returncode == 0 and "no LMCache series exported" in table.stdout


def test_restart_changes_only_that_pid_and_the_model_is_ready_again(up: Deployment) -> None:
    before = pids(up)
    refused = up.cli("restart", "decode")  # one replica: a restart is a gap in service
    assert refused.returncode == 2 and refused.stdout == "" and refused.stderr.count("\n") == 1
    assert "restarting decode would stop serving: decode has 1 replica and needs 1 healthy" in refused.stderr
    assert "--allow-downtime" in refused.stderr and pids(up) == before
    started = time.monotonic()
    done = up.cli("restart", "decode", "--allow-downtime")
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    after = pids(up)
    assert after["decode"] != before["decode"] and not alive(before["decode"])
    assert {k: v for k, v in after.items() if k != "decode"} == {
        k: v for k, v in before.items() if k != "decode"
    }
    assert f"pid {before['decode']} -> {after['decode']}, healthy; deployment ready" in done.stdout
    assert status(up)["deployment"]["state"] == "ready"
    assert up.chat().status_code == 200
    assert took < 30, f"restart took {took:.1f} s"


def test_stop_then_start(up: Deployment) -> None:
    stopped = up.cli("stop", "prefill")
    assert stopped.returncode == 0, stopped.stderr
    doc = status(up)
    prefill = next(p for p in doc["processes"] if p["name"] == "prefill")
    assert (
        prefill["state"] == "stopped" and prefill["pid"] is None and doc["deployment"]["state"] == "degraded"
    )
    started = up.cli("start", "prefill")
    assert started.returncode == 0, started.stderr
    assert "started prefill" in started.stdout and "deployment ready" in started.stdout
    assert status(up)["deployment"]["state"] == "ready" and up.chat().status_code == 200


def test_logs_tail_and_follow(up: Deployment) -> None:
    tail = up.cli("logs", "frontend", "-n", "5")
    assert tail.returncode == 0, tail.stderr
    assert 0 < len(tail.stdout.splitlines()) <= 5
    follow = subprocess.Popen(
        [CLI, "logs", "frontend", "-f", "-n", "0"],
        env=up.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(follow.stdout), daemon=True)
    reader.start()
    try:
        # Ask until a new line shows up: the follower may still be starting when the first answer is logged.
        def followed() -> bool:
            up.chat()
            return any("/v1/chat/completions" in line for line in list(lines))

        wait_for(followed, 30, interval=0.2, what="a followed log line about the request")
    finally:
        follow.terminate()
        follow.wait(timeout=10)
        reader.join(timeout=10)


def test_smoke_sends_the_prompt_twice_and_reports_honestly(up: Deployment) -> None:
    done = up.cli("smoke", "--prompt-tokens", "512", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    first, repeat = report["attempts"]
    assert first["prompt_tokens"] == repeat["prompt_tokens"] > 100
    assert 0 < first["ttft_s"] <= first["total_s"] and 0 < repeat["ttft_s"] <= repeat["total_s"]
    assert first["cached_tokens"] == 0  # a fresh nonce: nothing to reuse yet
    # The disaggregated mocker reports no cached tokens even on the repeat (demo-agg does): no claim.
    assert report["reuse_seen"] == bool(repeat["cached_tokens"])
    text = up.cli("smoke", "--prompt-tokens", "256")
    assert text.returncode == 0 and "repeat: TTFT" in text.stdout and "cache reuse:" in text.stdout


def test_down_ends_everything(up: Deployment) -> None:
    before = pids(up)
    socket_path = up.state_dir / "control.sock"
    done = up.cli("down", timeout=90)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"stopped demo (supervisor pid {up.proc.pid}) in ")
    assert up.proc.wait(timeout=30) == 0
    assert not any(alive(pid) for pid in before.values())
    assert not socket_path.exists() and not (up.state_dir / "targets.json").exists()
    gone = up.cli("status")
    assert gone.returncode == 1 and "no running deployment" in gone.stderr
    after = up.cli("logs", "decode", "-n", "2")  # a stopped deployment's logs are still readable
    assert after.returncode == 0 and len(after.stdout.splitlines()) == 2
    unknown = up.cli("logs", "nope")
    assert unknown.returncode == 2 and unknown.stderr.startswith(
        "lmcache-supervise: no log for process 'nope'"
    )
