"""The sd_notify client against real AF_UNIX datagram sockets owned by the test."""

from __future__ import annotations

import array
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from supervisor.control import notify
from supervisor.control.notify import Notifier, SystemdBridge, describe
from supervisor.engine.states import (
    DeploymentEvent,
    DeploymentState,
    DeploymentStatus,
    ProcessState,
    ProcessStatus,
)

SO_PASSCRED = getattr(socket, "SO_PASSCRED", 16)
SCM_CREDENTIALS = getattr(socket, "SCM_CREDENTIALS", 2)


class Listener:
    """A datagram socket standing in for systemd's: receives messages and the sender's pid."""

    def __init__(self, address: str | bytes) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)  # what systemd checks for NotifyAccess
        self.sock.bind(address)
        self.sock.settimeout(5.0)

    @property
    def env_value(self) -> str:
        if isinstance(self.address, bytes):
            return "@" + self.address[1:].decode()
        return self.address

    def receive(self) -> tuple[list[str], int]:
        """One datagram's fields and the pid the kernel vouches for."""
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == SCM_CREDENTIALS:
                pid = array.array("i", payload[: struct.calcsize("3i")])[0]
        return data.decode().split("\n"), pid

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    server = Listener(str(tmp_path / "notify.sock"))
    yield server
    server.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    server = Listener(b"\0lmcache-supervise-test-" + uuid.uuid4().hex.encode())
    yield server
    server.close()


def test_socket_address_forms() -> None:
    assert notify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert (
        notify.socket_address("@/org/freedesktop/systemd1/notify/1")
        == b"\0/org/freedesktop/systemd1/notify/1"
    )
    for unusable in ("", "@", "relative/path", "vsock:2:1234"):
        assert notify.socket_address(unusable) is None, unusable


def test_watchdog_interval_is_half_and_only_for_us() -> None:
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, pid=4242) is None
    for bad in ("", "0", "-5", "1.5", "30s"):
        assert notify.watchdog_interval({"WATCHDOG_USEC": bad}) is None, bad
    assert notify.watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "x"}) is None


def test_every_message_arrives_whole_from_our_pid(listener: Listener) -> None:
    with Notifier(listener.address) as notifier:
        assert notifier.enabled
        assert notifier.status("starting: 1/3 processes healthy")
        assert listener.receive() == (["STATUS=starting: 1/3 processes healthy"], os.getpid())
        assert notifier.ready("ready: 3/3 processes healthy")
        assert listener.receive()[0] == ["READY=1", "STATUS=ready: 3/3 processes healthy"]
        assert notifier.watchdog()
        assert listener.receive()[0] == ["WATCHDOG=1"]
        assert notifier.extend_timeout(90)
        assert listener.receive()[0] == ["EXTEND_TIMEOUT_USEC=90000000"]
        assert notifier.stopping("stopping")
        assert listener.receive()[0] == ["STOPPING=1", "STATUS=stopping"]
        assert notifier.sent == 5


def test_reloading_carries_the_monotonic_clock(listener: Listener) -> None:
    with Notifier(listener.address) as notifier:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading("reloading profile")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields, _ = listener.receive()
    assert fields[0] == "RELOADING=1"
    assert fields[2] == "STATUS=reloading profile"
    key, _, value = fields[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_a_status_cannot_smuggle_another_field(listener: Listener) -> None:
    with Notifier(listener.address) as notifier:
        notifier.status("model loading\nREADY=1")
    assert listener.receive()[0] == ["STATUS=model loading READY=1"]


def test_abstract_namespace_socket(abstract_listener: Listener) -> None:
    environ = {"NOTIFY_SOCKET": abstract_listener.env_value}
    with Notifier.from_env(environ) as notifier:
        assert notifier.ready()
    assert abstract_listener.receive() == (["READY=1"], os.getpid())


def test_from_env_reads_then_unsets(listener: Listener) -> None:
    environ = {
        "NOTIFY_SOCKET": listener.env_value,
        "WATCHDOG_USEC": "4000000",
        "WATCHDOG_PID": str(os.getpid()),
        "PATH": "/usr/bin",
    }
    notifier = Notifier.from_env(environ)
    assert notifier.watchdog_s == 2.0
    assert environ == {"PATH": "/usr/bin"}
    kept = {"NOTIFY_SOCKET": listener.env_value}
    assert Notifier.from_env(kept, unset=False).enabled and "NOTIFY_SOCKET" in kept


def test_children_spawned_after_from_env_never_see_the_socket(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    with Notifier.from_env() as notifier:
        assert notifier.enabled
        script = "import os; print([k for k in ('NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID') if k in os.environ])"
        seen = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert seen.stdout.strip() == "[]"


def test_no_socket_means_no_op_and_no_error() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled and notifier.watchdog_s is None
    assert notifier.ready("x") is False and notifier.watchdog() is False
    assert notifier.last_error is None and notifier.sent == 0


def test_watchdog_without_a_socket_is_off() -> None:
    assert Notifier.from_env({"WATCHDOG_USEC": "1000000"}).watchdog_s is None


def test_a_vanished_socket_costs_the_message_not_the_caller(tmp_path: Path) -> None:
    server = Listener(str(tmp_path / "gone.sock"))
    notifier = Notifier(server.address)
    assert notifier.status("first")
    server.close()
    os.unlink(server.address)
    assert notifier.status("second") is False
    assert isinstance(notifier.last_error, (FileNotFoundError, ConnectionRefusedError))
    notifier.close()


# ---- the bridge from runner events to sd_notify ------------------------------------------------


def snapshot(state: DeploymentState, **procs: ProcessState) -> DeploymentStatus:
    return DeploymentStatus(
        name="demo",
        state=state,
        base_url="http://127.0.0.1:18000",
        model="demo",
        ready_since_wall=None,
        processes=tuple(
            ProcessStatus(
                name=n,
                role="decode",
                state=s,
                required=True,
                pid=None,
                started_wall=None,
                uptime_s=None,
                restarts=0,
                last_exit=None,
                last_probe=None,
                reason="pid 7 exit code 1; restarting in 0.5 s" if s is ProcessState.BACKOFF else "",
            )
            for n, s in procs.items()
        ),
    )


def event(old: DeploymentState, new: DeploymentState, status: DeploymentStatus) -> DeploymentEvent:
    return DeploymentEvent(old=old, new=new, reason="test", at=0.0, status=status)


P, D = ProcessState, DeploymentState


def test_describe_says_what_is_not_healthy() -> None:
    assert describe(snapshot(D.READY, frontend=P.RUNNING, decode=P.RUNNING, prefill=P.RUNNING)) == (
        "ready: 3/3 processes healthy, OpenAI API at http://127.0.0.1:18000/v1 (model demo)"
    )
    assert describe(snapshot(D.STARTING, frontend=P.RUNNING, decode=P.STARTING, prefill=P.WAITING)) == (
        "starting: 1/3 processes healthy; decode starting, prefill waiting"
    )
    assert describe(snapshot(D.DEGRADED, frontend=P.RUNNING, decode=P.BACKOFF)) == (
        "degraded: 1/2 processes healthy; decode backoff (pid 7 exit code 1; restarting in 0.5 s)"
    )
    assert describe(snapshot(D.STOPPED, frontend=P.STOPPED)) == "stopped"


def test_bridge_sends_ready_once_then_status_then_stopping(listener: Listener) -> None:
    bridge = SystemdBridge(Notifier(listener.address))
    bridge(event(D.STARTING, D.STARTING, snapshot(D.STARTING, decode=P.STARTING)))
    assert listener.receive()[0] == ["STATUS=starting: 0/1 processes healthy; decode starting"]
    ready = snapshot(D.READY, decode=P.RUNNING)
    bridge(event(D.STARTING, D.READY, ready))
    assert listener.receive()[0] == ["READY=1", f"STATUS={describe(ready)}"]
    bridge(event(D.READY, D.DEGRADED, snapshot(D.DEGRADED, decode=P.BACKOFF)))
    assert listener.receive()[0][0].startswith("STATUS=degraded: 0/1")
    bridge(event(D.DEGRADED, D.READY, ready))  # READY=1 is for the start (and reloads) only
    assert listener.receive()[0] == [f"STATUS={describe(ready)}"]
    bridge(event(D.READY, D.STOPPING, snapshot(D.STOPPING, decode=P.RUNNING)))
    assert listener.receive()[0] == ["STOPPING=1", "STATUS=stopping: 1/1 processes healthy"]
    bridge.notifier.close()


def test_bridge_reload_is_bracketed_by_reloading_and_ready(listener: Listener) -> None:
    bridge = SystemdBridge(Notifier(listener.address))
    bridge.ready_sent = True
    bridge.begin_reload("reloading: re-reading profile demo")
    fields = listener.receive()[0]
    assert fields[0] == "RELOADING=1" and fields[1].startswith("MONOTONIC_USEC=")
    # The deployment turning READY mid-reload does not end the reload: only end_reload does.
    bridge(event(D.DEGRADED, D.READY, snapshot(D.READY, decode=P.RUNNING)))
    assert listener.receive()[0][0].startswith("STATUS=ready")
    bridge.end_reload("reloaded: restarted decode")
    assert listener.receive()[0] == ["READY=1", "STATUS=reloaded: restarted decode"]
    bridge.notifier.close()


@pytest.mark.anyio
async def test_watchdog_and_extend_keep_coming_from_the_loop(listener: Listener) -> None:
    notifier = Notifier(listener.address, watchdog_s=0.05)
    bridge = SystemdBridge(notifier)
    loading = snapshot(D.STARTING, decode=P.STARTING)
    got: list[str] = []
    listener.sock.setblocking(False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(bridge.watchdog)
        tg.start_soon(bridge.extend_while_loading, lambda: loading)
        with anyio.fail_after(5):
            while got.count("WATCHDOG=1") < 4 or not any(f.startswith("EXTEND_TIMEOUT_USEC=") for f in got):
                await anyio.wait_readable(listener.sock)
                got += listener.sock.recv(4096).decode().split("\n")
        tg.cancel_scope.cancel()
    # extend asks for three ticks (the tick follows the watchdog's pace): 3 x 0.05 s.
    assert "EXTEND_TIMEOUT_USEC=150000" in got
    notifier.close()


def test_a_reload_during_the_start_does_not_claim_ready(listener: Listener) -> None:
    bridge = SystemdBridge(Notifier(listener.address))
    loading = snapshot(D.STARTING, decode=P.STARTING)
    bridge.follow(lambda: loading)  # what serve() does with the runner's status
    assert listener.receive()[0][0].startswith("STATUS=starting")
    bridge.begin_reload("reloading: re-reading profile demo")
    assert listener.receive()[0] == ["STATUS=reloading: re-reading profile demo"]  # no RELOADING=1 yet
    bridge.end_reload("reloaded: restarted decode")
    assert listener.receive()[0] == ["STATUS=reloaded: restarted decode"]  # and no READY=1
    ready = snapshot(D.READY, decode=P.RUNNING)
    bridge(event(D.STARTING, D.READY, ready))
    assert listener.receive()[0] == ["READY=1", f"STATUS={describe(ready)}"]
    bridge.notifier.close()
