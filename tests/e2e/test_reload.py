"""Reload for real: `up` a copy of the demo, change one worker's env, reload; then a broken profile.

Only the changed worker gets a new pid, the deployment is ready again when `reload` returns, and
systemd sees RELOADING=1 ... READY=1. A profile that no longer validates changes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import MARKER, SESSION, alive, free_port_base, reap_marked, wait_for
from fake_systemd import FakeSystemd

pytestmark = pytest.mark.e2e
CLI = str(Path(sys.executable).parent / "lmcache-supervise")
PROFILES = Path(__file__).resolve().parents[2] / "profiles"
NAMES = ("frontend", "decode", "prefill")


def profile_text(decode_env: str = "") -> str:
    # The model path is absolute: a relative one would be read against this file's directory.
    return f'''extends = "{PROFILES / 'demo.toml'}"
name = "reloadable"

[model]
name = "{PROFILES / 'demo-model'}"

[workers.decode]
stop_timeout_s = 3
{decode_env}
[workers.prefill]
stop_timeout_s = 3
'''


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    profile: Path
    env: dict[str, str]
    stderr: Path
    fake: FakeSystemd
    base: int

    def events(self) -> list[dict]:
        lines = self.stderr.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{") and line.endswith("}")]

    def pids(self) -> dict[str, int]:
        """Each process's newest pid, from the supervisor's own "process starting" events."""
        found: dict[str, int] = {}
        for event in self.events():
            if event.get("event") == "process starting" and event.get("pid"):
                found[event["process"]] = event["pid"]
        return found

    def reload(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLI, "reload", "reloadable", "--timeout", "60"], env=self.env,
                              check=False, capture_output=True, text=True, timeout=90)

    def serves(self) -> bool:
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        with httpx.Client(trust_env=False) as client:
            ready = client.get(f"http://127.0.0.1:{self.base}/v1/models/demo/ready", timeout=5)
            chat = client.post(f"http://127.0.0.1:{self.base}/v1/chat/completions", json=body, timeout=30)
        return ready.status_code == 200 and chat.status_code == 200


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    base = free_port_base(602)
    marker = f"{SESSION}-e2e-{uuid.uuid4().hex[:8]}"
    profile = tmp_path / "reloadable.toml"
    profile.write_text(profile_text())
    fake = FakeSystemd(str(tmp_path / "notify.sock"), f"http://127.0.0.1:{base}/v1/models/demo/ready")
    env = {**os.environ, "LMCACHE_SUPERVISE_STATE_ROOT": str(tmp_path / "state"), MARKER: marker}
    env.pop("LMCACHE_SUPERVISE_DEBUG", None)
    stderr = tmp_path / "up.err"
    with open(tmp_path / "up.out", "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen([CLI, "up", str(profile), "--quiet-children", "--set", f"ports.base={base}"],
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env={**env, "NOTIFY_SOCKET": fake.path})
    run = Running(proc, profile, env, stderr, fake, base)
    try:
        wait_for(lambda: fake.with_field("READY=1") or proc.poll() is not None, 60, what="deployment ready")
        assert proc.poll() is None, stderr.read_text()[-3000:]
        yield run
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        fake.close()
        leaked = reap_marked(marker)
        assert not leaked, f"processes left behind: {leaked}"


def test_reload_restarts_only_the_changed_worker_and_refuses_a_broken_profile(running: Running) -> None:
    before = running.pids()
    assert set(before) == set(NAMES)

    # 1. One worker's env changes: only that worker restarts, and `reload` returns once it serves.
    running.profile.write_text(profile_text('env = { GREETING = "hello" }'))
    done = running.reload()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "reloaded reloadable: restarted decode"
    after = running.pids()
    assert after["decode"] != before["decode"] and not alive(before["decode"])
    assert {n: after[n] for n in ("frontend", "prefill")} == {n: before[n] for n in ("frontend", "prefill")}
    assert all(alive(after[n]) for n in NAMES)
    assert psutil.Process(after["decode"]).environ().get("GREETING") == "hello"
    assert running.serves()
    reloading = running.fake.with_field("RELOADING=1")
    assert len(reloading) == 1 and reloading[0].fields[1].startswith("MONOTONIC_USEC=")
    ends = [m for m in running.fake.with_field("READY=1") if m.at > reloading[0].at]
    assert ends and ends[0].fields == ["READY=1", "STATUS=reloaded: restarted decode"]

    # 2. A profile that no longer validates, by plain SIGHUP: refused, one error event, nothing moves.
    running.profile.write_text(profile_text('role = "sideways"'))
    errors_before = sum(e.get("level") == "error" for e in running.events())
    os.kill(running.proc.pid, signal.SIGHUP)
    wait_for(lambda: len(running.fake.with_field("RELOADING=1")) == 2 and any(
        f.startswith("STATUS=reload refused: ") for m in running.fake.with_field("READY=1") for f in m.fields),
        10, what="the refused reload to end with READY=1")
    errors = [e for e in running.events() if e.get("level") == "error"]
    assert len(errors) == errors_before + 1
    assert "workers.decode.role" in errors[-1]["error"] and "keeps running" in errors[-1]["event"]
    assert running.pids() == after and all(alive(after[n]) for n in NAMES)
    assert running.proc.poll() is None and running.serves()

    # 3. The same through the command: it says why, exits 2 (bad input), and still nothing moves.
    refused = running.reload()
    assert refused.returncode == 2
    assert "refused, every process keeps running" in refused.stderr and "workers.decode.role" in refused.stderr
    assert running.pids() == after and running.proc.poll() is None
