"""Reload for real: `up` a copy of the demo, change one worker's env, reload; then a broken profile.

Only the changed worker gets a new pid, the deployment is ready again when `reload` returns, and
systemd sees RELOADING=1 ... READY=1. A profile that no longer validates changes nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import alive, wait_for
from fake_systemd import FakeSystemd
from harness import Deployment

pytestmark = pytest.mark.e2e
PROFILES = Path(__file__).resolve().parents[2] / "profiles"
NAMES = ("frontend", "decode", "prefill")


def profile_text(decode_env: str = "") -> str:
    return f'''extends = "{PROFILES / "demo.toml"}"
name = "reloadable"

[workers.decode]
stop_timeout_s = 3
{decode_env}
[workers.prefill]
stop_timeout_s = 3
'''


@dataclass
class Running:
    up: Deployment
    profile: Path
    fake: FakeSystemd

    def pids(self) -> dict[str, int]:
        """Each process's newest pid, from the supervisor's own "process starting" events."""
        return {name: pid for name in NAMES if (pid := self.up.newest_pid(name))}

    def reload(self, *name: str) -> subprocess.CompletedProcess[str]:
        """``reload -d reloadable`` as every command names a deployment, or the positional form given."""
        return self.up.cli("reload", *(name or ("-d", "reloadable")), "--timeout", "60", timeout=90)

    def serves(self) -> bool:
        with httpx.Client(trust_env=False) as client:
            ready = client.get(f"{self.up.url}/v1/models/demo/ready", timeout=5)
        return ready.status_code == 200 and self.up.chat(max_tokens=3).status_code == 200


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    profile = tmp_path / "reloadable.toml"
    profile.write_text(profile_text())  # its model is the parent's ./demo-model, beside demo.toml
    fake = FakeSystemd(str(tmp_path / "notify.sock"), "")
    up = Deployment(
        tmp_path,
        fast_stop=False,
        profile=str(profile),
        name="reloadable",
        env={"NOTIFY_SOCKET": fake.path},
    ).start()
    fake.ready_url = f"{up.url}/v1/models/demo/ready"  # set long before READY=1 can come (~1 s)
    try:
        wait_for(
            lambda: fake.with_field("READY=1") or up.proc.poll() is not None, 60, what="deployment ready"
        )
        assert up.proc.poll() is None, up.stderr[-3000:]
        yield Running(up, profile, fake)
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(timeout=30) == 0
    finally:
        up.stop_clean()
        fake.close()


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
    errors_before = sum(e.get("level") == "error" for e in running.up.event_data())
    os.kill(running.up.proc.pid, signal.SIGHUP)
    wait_for(
        lambda: (
            len(running.fake.with_field("RELOADING=1")) == 2
            and any(
                f.startswith("STATUS=reload refused: ")
                for m in running.fake.with_field("READY=1")
                for f in m.fields
            )
        ),
        10,
        what="the refused reload to end with READY=1",
    )

    def errors() -> list:
        return [e for e in running.up.event_data() if e.get("level") == "error"]

    # The harness reads the supervisor's stderr on a thread: the event may trail READY=1 a little.
    wait_for(lambda: len(errors()) > errors_before, 10, what="the refused reload's error event")
    assert len(errors()) == errors_before + 1
    assert "workers.decode.role" in errors()[-1]["error"] and "keeps running" in errors()[-1]["event"]
    assert running.pids() == after and all(alive(after[n]) for n in NAMES)
    assert running.up.proc.poll() is None and running.serves()

    # 3. The same through the command: it says why, exits 2 (bad input), and still nothing moves.
    refused = running.reload("reloadable")  # the positional form it had first
    assert refused.returncode == 2
    assert (
        "refused, every process keeps running" in refused.stderr and "workers.decode.role" in refused.stderr
    )
    assert running.pids() == after and running.up.proc.poll() is None
