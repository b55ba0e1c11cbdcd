"""Forgetting a SIGKILLed worker's file-discovery entries, against a real mocker's registration."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import free_port_base, wait_for

from supervisor.engine.discovery import forget_worker

MODEL = Path(__file__).resolve().parents[2] / "profiles" / "demo-model"


def start_mocker(kv: Path, port: int, mode: str, extra: list[str]) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DYN_DISCOVERY_BACKEND": "file",
        "DYN_FILE_KV": str(kv),
        "DYN_SYSTEM_PORT": str(port),
        "DYN_SYSTEM_HOST": "127.0.0.1",
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_EVENT_PLANE_HOST": "127.0.0.1",
        "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
        "DYN_SYSTEM_STARTING_HEALTH_STATUS": "ready",
    }
    argv = [
        sys.executable,
        "-m",
        "dynamo.mocker",
        "--model-path",
        str(MODEL),
        "--model-name",
        "demo",
        "--disaggregation-mode",
        mode,
        *extra,
    ]
    return subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def entries(kv: Path) -> set[Path]:
    """Registered entries; Dynamo writes each through a temporary file renamed into place."""
    return {p.relative_to(kv) for p in kv.rglob("*") if p.is_file() and not p.name.startswith(".tmp")}


def test_forget_worker_removes_only_the_dead_workers_entries(tmp_path: Path) -> None:
    kv = tmp_path / "kv"
    base = free_port_base(3)
    decode = start_mocker(kv, base, "decode", [])
    prefill = start_mocker(kv, base + 1, "prefill", ["--bootstrap-ports", str(base + 2)])
    try:

        def cards() -> list[str]:
            mdc = kv / "v1" / "mdc"
            return sorted(p.read_text() for p in mdc.iterdir()) if mdc.is_dir() else []

        def registered() -> bool:
            # A worker writes its model card and its instance entry separately: wait for both of each.
            if len(cards()) != 2:
                return False
            leases = [name.rsplit("%2F", 1)[-1] for name in os.listdir(kv / "v1" / "mdc")]
            instances = kv / "v1" / "instances"
            names = os.listdir(instances) if instances.is_dir() else []
            return all(any(n.endswith(f"%2F{lease}") for n in names) for lease in leases)

        wait_for(registered, 30, what="both mockers registered (model cards and instances)")
        before = entries(kv)
        os.killpg(decode.pid, signal.SIGKILL)
        decode.wait(timeout=10)

        removed = forget_worker(str(kv), base)

        assert any(r.startswith("instances/") and "backend" in r for r in removed), removed
        assert any(r.startswith("mdc/") for r in removed), removed
        gone = {Path("v1") / r for r in removed}
        after = entries(kv)  # the live prefill worker may have written more since
        assert gone <= before and not gone & after and before - gone <= after
        assert len(cards()) == 1 and f":{base + 1}/v1/metadata/" in cards()[0]  # prefill's card stays
        assert forget_worker(str(kv), base) == []  # idempotent
    finally:
        for proc in (decode, prefill):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_unknown_layout_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "v2" / "mdc").mkdir(parents=True)
    (tmp_path / "v2" / "mdc" / "x%2Fabc").write_text('{"path": "http://127.0.0.1:8081/v1/metadata/"}')
    assert forget_worker(str(tmp_path), 8081) == []
    assert forget_worker(str(tmp_path / "missing"), 8081) == []
    assert (tmp_path / "v2" / "mdc" / "x%2Fabc").exists()
