"""`up demo` under a stand-in for systemd: a datagram socket the test owns as NOTIFY_SOCKET.

The supervisor is started the way systemd starts a Type=notify service: NOTIFY_SOCKET set, and
WATCHDOG_USEC (1 s here) with WATCHDOG_PID naming the exec'd supervisor itself. The test receives
every datagram with the sender's kernel-checked pid (what NotifyAccess=main relies on).
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import wait_for
from fake_systemd import FakeSystemd
from harness import Deployment

pytestmark = pytest.mark.e2e
WATCHDOG_USEC = 1_000_000
# What systemd does between fork and exec, in Python: WATCHDOG_PID is the pid that will run the
# service, known only in the child. (No shell: argv is passed through untouched.)
EXEC_AS_SERVICE = (
    "import os, sys; os.environ['WATCHDOG_PID'] = str(os.getpid()); os.execv(sys.argv[1], sys.argv[1:])"
)


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], FakeSystemd]]:
    fake = FakeSystemd(str(tmp_path / "notify.sock"), "")
    up = Deployment(
        tmp_path,
        env={"NOTIFY_SOCKET": fake.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)},
        wrapper=(sys.executable, "-c", EXEC_AS_SERVICE),
    ).start()
    fake.ready_url = f"{up.url}/v1/models/demo/ready"  # set long before READY=1 can come (~1 s)
    try:
        yield up.proc, fake
    finally:
        up.stop_clean()
        fake.close()


def test_ready_only_once_serving_watchdog_keeps_coming_stopping_at_sigterm(supervised) -> None:
    proc, fake = supervised
    ready = wait_for(lambda: fake.with_field("READY=1") or proc.poll() is not None, 60, what="READY=1")
    assert proc.poll() is None, "supervisor exited before READY=1"
    first = ready[0]
    # READY=1 comes only once the model is ready: the ready URL answers 200 the moment it arrives,
    # and systemd was told "starting" before that.
    assert first.ready_url_status == 200
    assert first.fields[1].startswith("STATUS=ready: 3/3 processes healthy, OpenAI API at http://127.0.0.1:")
    before = [m for m in fake.messages if m.at < first.at]
    assert before and all("READY=1" not in m.fields for m in before)
    assert any(f.startswith("STATUS=starting: ") for m in before for f in m.fields)
    # Every message came from the supervisor itself (what NotifyAccess=main accepts).
    assert {m.pid for m in fake.messages} == {proc.pid}

    # The watchdog: pings keep coming at half of WATCHDOG_USEC, well inside it.
    wait_for(
        lambda: len([m for m in fake.with_field("WATCHDOG=1") if m.at > first.at]) >= 4,
        10,
        what="four watchdog pings after READY=1",
    )
    # systemd arms the watchdog at READY=1: from then on no gap may reach WATCHDOG_USEC.
    pings = [first.at] + [m.at for m in fake.with_field("WATCHDOG=1") if m.at > first.at]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps
    # More start time is asked for only while starting (the demo loads in well under a second, so
    # there may be none); its size is three ticks of the watchdog's pace.
    extends = fake.with_field("EXTEND_TIMEOUT_USEC=")
    assert all(m.at < first.at and m.fields == ["EXTEND_TIMEOUT_USEC=1500000"] for m in extends)
    print(
        "sd_notify after start:",
        *(f"{m.at - fake.messages[0].at:6.3f} {' | '.join(m.fields)}" for m in fake.messages),
        sep="\n",
    )

    # Children never see systemd's variables.
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 4  # guardian, frontend, decode, prefill
    for child in children:
        leaked = {k for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID") if k in child.environ()}
        assert not leaked, f"{child.pid} {child.cmdline()[:3]} inherited {leaked}"

    sent_term = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    stopping = fake.with_field("STOPPING=1")
    assert len(stopping) == 1 and stopping[0].at >= sent_term
    assert stopping[0].fields[1].startswith("STATUS=stopping")
    assert any(f == "STATUS=stopped" for m in fake.messages if m.at > stopping[0].at for f in m.fields)
