"""A real ``lmcache-supervise up`` in a process of its own, for the end-to-end tests.

Every process it starts inherits the test's marker, so :meth:`Up.stop` can tell (and kill) any
process left behind. The supervisor's stderr is JSON lines (it is not a terminal): :meth:`Up.events`
reads them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import proctools
from conftest import MARKER, SESSION, free_port_base, reap_marked, wait_for

CLI = proctools.CLI
DEMO_PORT_SPAN = 602  # frontend +0, worker health +81/+82, metrics +90, prefill bootstrap +601
# A prefill request whose decode side died keeps the mocker prefill's graceful stop waiting for the
# worker stop timeout (30 s by default); SIGKILL follows the timeout, so short ones keep tests fast.
FAST_STOP = ("--set", "workers.decode.stop_timeout_s=3", "--set", "workers.prefill.stop_timeout_s=3")


@dataclass
class Up:
    """A running supervisor: its process, ports, environment and output files."""

    proc: subprocess.Popen[bytes]
    base: int
    env: dict[str, str]
    marker: str
    stdout: Path
    stderr: Path
    name: str = "demo"

    @classmethod
    def start(
        cls,
        tmp: Path,
        *args: str,
        profile: str = "demo",
        name: str = "demo",
        env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> Up:
        """``[*wrapper] lmcache-supervise up PROFILE --set ports.base=<free> *args``, state under ``tmp``."""
        base = free_port_base(DEMO_PORT_SPAN)
        marker = f"{SESSION}-e2e-{uuid.uuid4().hex[:8]}"
        full_env = {**os.environ, "LMCACHE_SUPERVISE_STATE_ROOT": str(tmp / "state"), MARKER: marker}
        full_env.pop("LMCACHE_SUPERVISE_DEBUG", None)
        stdout, stderr = tmp / "up.out", tmp / "up.err"
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            proc = subprocess.Popen(
                [*wrapper, CLI, "up", profile, "--set", f"ports.base={base}", *args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env={**full_env, **(env or {})},
            )
        return cls(proc, base, full_env, marker, stdout, stderr, name)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until ``up`` prints its ready line; fails with its stderr if it exits first."""
        wait_for(
            lambda: "ready:" in self.stdout.read_text() or self.proc.poll() is not None,
            timeout,
            what="deployment ready",
        )
        assert self.proc.poll() is None, self.stderr.read_text()[-3000:]

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 60 s), then fail the test if any marked process outlived it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        leaked = reap_marked(self.marker)
        assert not leaked, f"processes left behind: {leaked}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.base}"

    @property
    def state_dir(self) -> Path:
        return Path(self.env["LMCACHE_SUPERVISE_STATE_ROOT"]) / self.name

    def events(self) -> list[dict]:
        out = []
        for line in self.stderr.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def count(self, event: str) -> int:
        return sum(e.get("event") == event for e in self.events())

    def pid(self, process: str) -> int | None:
        """The pid of the newest incarnation of ``process``, from the supervisor's own events."""
        pids = [
            e["pid"]
            for e in self.events()
            if e.get("event") == "process starting" and e.get("process") == process
        ]
        return pids[-1] if pids else None

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CLI, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def chat(self, max_tokens: int = 4) -> httpx.Response:
        body = {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens}
        with httpx.Client(trust_env=False) as client:
            return client.post(f"{self.url}/v1/chat/completions", json=body, timeout=30)
