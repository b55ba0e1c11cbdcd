"""A small sd_notify client: tell systemd when the deployment is ready, reloading or stopping.

systemd's ``Type=notify`` protocol is one AF_UNIX datagram per message, ``KEY=VALUE`` lines, sent to
the socket named by ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Nothing here
needs libsystemd. With ``NOTIFY_SOCKET`` unset (a terminal, a test, another init) every call is a
no-op, so callers never branch on "are we under systemd".

The variables are read once and then removed from our own environment (libsystemd's
``unset_environment``): any process we spawn, exec probes included, must never talk to systemd as
if it were the supervisor. ``process.py`` strips them from children's environments as well.

Sending never raises: a full or vanished socket costs a notification, never supervision. The first
failure is remembered in :attr:`Notifier.last_error` for the caller to log once.

:class:`SystemdBridge` turns the runner's events into messages (it is an observer, the runner knows
nothing of systemd) and runs the two periodic senders in the runner's event loop: ``WATCHDOG=1``,
and ``EXTEND_TIMEOUT_USEC`` while a model is still loading.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Protocol

import anyio

from supervisor.control.gpus import quarantine_phrase
from supervisor.engine.states import (
    DeploymentEvent,
    DeploymentState,
    DeploymentStatus,
    ProcessState,
    RunnerEvent,
)
from supervisor.eventlog import log

#: Our own variables that describe systemd's notify and watchdog contract.
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str) -> str | bytes | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value: a path, or ``@name`` -> abstract ``\\0name``.

    Anything else (empty, relative, ``vsock:`` from systemd >= 253 for VMs) is not for us: None.
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], *, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises.

    None when the watchdog is off: ``WATCHDOG_USEC`` unset, not a positive integer (libsystemd
    returns -EINVAL and pings nothing; so do we), or ``WATCHDOG_PID`` naming another process
    (the variables were inherited and the watchdog is not ours to feed).
    """
    usec_text = environ.get("WATCHDOG_USEC", "")
    if not usec_text.isdigit() or int(usec_text) <= 0:
        return None
    pid_text = environ.get("WATCHDOG_PID", "")
    if pid_text and (not pid_text.isdigit() or int(pid_text) != (os.getpid() if pid is None else pid)):
        return None
    return int(usec_text) / 1_000_000 / 2


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock systemd compares ``MONOTONIC_USEC`` against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _field(key: str, value: str) -> str:
    # A newline inside a value would start a new field: "STATUS=x\nREADY=1" must not lie to systemd.
    return f"{key}={' '.join(value.splitlines())}"


class Notifier:
    """Sends sd_notify messages to one socket, or nothing when ``address`` is None.

    Build it with :meth:`from_env` at startup; pass ``Notifier(None)`` where notifications are off.
    """

    def __init__(self, address: str | bytes | None, *, watchdog_s: float | None = None) -> None:
        self.address = address
        #: Half the systemd watchdog timeout, or None when systemd does not watch us.
        self.watchdog_s = watchdog_s if address is not None else None
        self.last_error: OSError | None = None
        self.sent = 0
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True) -> Notifier:
        """Read ``NOTIFY_SOCKET`` / ``WATCHDOG_*`` and, with ``unset``, remove them from ``environ``."""
        env = os.environ if environ is None else environ
        address = socket_address(env.get("NOTIFY_SOCKET", ""))
        watchdog_s = watchdog_interval(env)
        if unset:
            for key in NOTIFY_ENV:
                env.pop(key, None)
        return cls(address, watchdog_s=watchdog_s)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields as one datagram; True if systemd (or whoever listens) got it."""
        if self.address is None or not fields:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            self.last_error = exc
            return False
        self.sent += 1
        return True

    # --- the messages the supervisor sends ---------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """The deployment serves: systemd finishes ``start`` (or a reload) here."""
        return self.send("READY=1", *([_field("STATUS", status)] if status else []))

    def status(self, text: str) -> bool:
        """Free text shown by ``systemctl status``."""
        return self.send(_field("STATUS", text))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([_field("STATUS", status)] if status else []))

    def reloading(self, status: str | None = None) -> bool:
        """A reload starts; ``READY=1`` ends it. ``MONOTONIC_USEC`` is required by systemd >= 253."""
        fields = ["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}"]
        return self.send(*fields, *([_field("STATUS", status)] if status else []))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask systemd for ``seconds`` more before its start/stop timeout fires (a model still loading)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1_000_000))}")

    def watchdog(self) -> bool:
        """Keep-alive; must come from the event loop itself so that a stuck loop stops the pings."""
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------ runner -> systemd

#: How often to ask for more start time while a model loads (without a watchdog to pace us), and
#: how much to ask for: three missed ticks before systemd's own timeout may fire.
EXTEND_TICK_S = 10.0
EXTEND_TICKS = 3


def describe(status: DeploymentStatus) -> str:
    """One line for ``systemctl status``: the deployment state, healthy count, and what is not healthy."""
    procs = status.processes
    healthy = sum(p.state is ProcessState.RUNNING for p in procs)
    head = f"{status.state.value}: {healthy}/{len(procs)} processes healthy"
    quarantined = quarantine_phrase(status)
    if quarantined:
        head = f"{head}, {quarantined}"
    if status.state is DeploymentState.STOPPED:
        return "stopped"
    # Which process (a replica by name) is not healthy, and why: a failed replica says its crash loop
    # and when it is retried, also while the rest keep the deployment ready.
    others = [
        f"{p.name} {p.state.value}"
        + (f" ({p.reason})" if p.reason and p.state is not ProcessState.STARTING else "")
        for p in procs
        if p.state is not ProcessState.RUNNING
    ]
    if status.state is DeploymentState.READY:
        head = f"{head}, OpenAI API at {status.base_url}/v1 (model {status.model})"
    return f"{head}; {', '.join(others)}" if others else head


class _HasStatus(Protocol):
    def status(self) -> DeploymentStatus: ...


class SystemdBridge:
    """A runner observer that tells systemd what the deployment is doing.

    ``READY=1`` once the deployment is first READY (and again to end a reload), ``STATUS=`` on every
    change of the line :func:`describe` gives, ``STOPPING=1`` when the shutdown starts.
    """

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.ready_sent = False
        self.reloading = False
        self._last_status = ""
        self._source: Callable[[], DeploymentStatus] | None = None
        self._error_logged = False

    def __call__(self, event: RunnerEvent) -> None:
        if not isinstance(event, DeploymentEvent):
            # A process changed: refresh the line (e.g. "decode starting") once we can see the status.
            if self._source is not None:
                self.update(describe(self._source()))
            return
        text = describe(event.status)
        if event.new is DeploymentState.READY and not self.ready_sent and not self.reloading:
            self.ready_sent = True
            self._sent(text, self.notifier.ready(text))
        elif event.new is DeploymentState.STOPPING:
            self._sent(text, self.notifier.stopping(text))
        else:
            self.update(text)

    def update(self, text: str) -> None:
        """``STATUS=text`` unless systemd already shows exactly that."""
        if text != self._last_status:
            self._sent(text, self.notifier.status(text))

    def _sent(self, text: str, ok: bool) -> None:
        self._last_status = text
        if not ok and self.notifier.enabled and not self._error_logged:
            self._error_logged = True  # once: a missing socket would otherwise flood the log
            log.warning(
                "sd_notify failed; systemd may not see our state",
                socket=str(self.notifier.address),
                error=str(self.notifier.last_error),
            )

    def follow(self, status: Callable[[], DeploymentStatus]) -> None:
        """Read the deployment's status from ``status`` (the runner's) on process events and reloads."""
        self._source = status
        self.update(describe(status()))

    async def serve(self, runner: _HasStatus) -> None:
        """The runner service: status refreshes on process events, the watchdog, start extensions."""
        self.follow(runner.status)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.watchdog)
            tg.start_soon(self.extend_while_loading, runner.status)

    def begin_reload(self, text: str) -> None:
        """``RELOADING=1``; before the first ``READY=1`` systemd would ignore it, so only ``STATUS=``."""
        self.reloading = True
        self._sent(text, self.notifier.reloading(text) if self.ready_sent else self.notifier.status(text))

    def end_reload(self, text: str) -> None:
        """``READY=1`` ends the reload, whatever its outcome: the deployment runs either way.

        A reload during the start ends without ``READY=1`` unless the deployment is ready by now:
        systemd must not consider a model that is still loading started.
        """
        self.reloading = False
        ready_now = self._source is not None and self._source().state is DeploymentState.READY
        if self.ready_sent or ready_now:
            self.ready_sent = True
            self._sent(text, self.notifier.ready(text))
        else:
            self._sent(text, self.notifier.status(text))

    async def watchdog(self) -> None:
        """``WATCHDOG=1`` every half ``WatchdogSec``, from the event loop: a stuck loop stops it."""
        interval = self.notifier.watchdog_s
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await anyio.sleep(interval)

    async def extend_while_loading(self, status: Callable[[], DeploymentStatus]) -> None:
        """While starting (or reloading) and a process is still in its startup probe, ask for more time."""
        if not self.notifier.enabled:
            return
        tick = min(self.notifier.watchdog_s or EXTEND_TICK_S, EXTEND_TICK_S)
        while True:
            snapshot = status()
            loading = any(p.state is ProcessState.STARTING for p in snapshot.processes)
            if loading and (self.reloading or not self.ready_sent):
                self.notifier.extend_timeout(tick * EXTEND_TICKS)
            await anyio.sleep(tick)
