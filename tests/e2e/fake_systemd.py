"""A stand-in for systemd's notify socket, for the e2e tests: it records every datagram."""

from __future__ import annotations

import array
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import httpx

CREDS = struct.calcsize("3i")


@dataclass
class Message:
    at: float
    pid: int
    fields: list[str]
    ready_url_status: int | None = None  # for READY=1: what GET ready_url said right after


@dataclass
class FakeSystemd:
    """Receives sd_notify datagrams on its own socket, on a thread, with arrival times."""

    path: str
    ready_url: str
    sock: socket.socket = field(init=False)
    messages: list[Message] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        with httpx.Client(trust_env=False) as client:
            while not self._stop.is_set():
                try:
                    data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(CREDS))
                except TimeoutError:
                    continue
                except OSError:
                    return
                pid = next(
                    (
                        array.array("i", p[:CREDS])[0]
                        for level, kind, p in anc
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                    ),
                    -1,
                )
                message = Message(time.monotonic(), pid, data.decode().split("\n"))
                if "READY=1" in message.fields and not any("READY=1" in m.fields for m in self.messages):
                    try:  # the moment READY=1 arrives, does the model say it is ready?
                        message.ready_url_status = client.get(self.ready_url, timeout=5).status_code
                    except httpx.HTTPError:
                        message.ready_url_status = -1
                self.messages.append(message)

    def with_field(self, prefix: str) -> list[Message]:
        return [m for m in list(self.messages) if any(f.startswith(prefix) for f in m.fields)]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.sock.close()
