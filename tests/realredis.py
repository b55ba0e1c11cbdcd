"""A real redis-server (plain, password, sentinel or cluster node) for tests, on a free loopback port.

The project's setup installs redis-server (``make system-deps``); a missing binary fails the test
loudly instead of skipping it, so a green run always means the real server was spoken to.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from proctools import free_port, wait_for


class Redis:
    """A real redis-server (or sentinel) on a free loopback port, stopped and reaped at the end."""

    def __init__(self, tmp: Path, *args: str, sentinel_conf: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:  # the project's setup installs it (make system-deps); never skip silently
            pytest.fail("redis-server is not installed: run `make system-deps` (scripts/system-deps.sh)")
        self.port = free_port(below=55000)
        self.log = tmp / "redis.log"
        tmp.mkdir(parents=True, exist_ok=True)
        if sentinel_conf is not None:
            conf = tmp / "sentinel.conf"
            conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {tmp}\n{sentinel_conf}\n")
            argv = [binary, str(conf), "--sentinel"]
        else:
            argv = [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp),
                *args,
            ]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._answers, 10.0, what=f"redis on port {self.port}")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"redis-server exited with {self.proc.returncode}: {self.log.read_text()[-800:]}"
            )
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
                return reply.startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator:
    started: list[Redis] = []

    def start(*args: str, sentinel_conf: str | None = None) -> Redis:
        server = Redis(tmp_path / f"redis{len(started)}", *args, sentinel_conf=sentinel_conf)
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()
    assert all(s.proc.poll() is not None for s in started)
