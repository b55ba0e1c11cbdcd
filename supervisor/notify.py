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
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, MutableMapping

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
    if pid_text:
        if not pid_text.isdigit() or int(pid_text) != (os.getpid() if pid is None else pid):
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
