"""``up demo`` as a person sees it: under a real pseudo-terminal (tmux), the screen read back.

The panel (the status table) is there and updates in place, no child's own log line reaches the
screen without ``--logs``, exactly one ``ready:`` line, and Ctrl-C shows the stop in order (prefill,
decode, frontend) before the command exits 0. With ``--logs`` the children's lines are interleaved
with a ``name |`` prefix, and no panel is drawn over them. Without a terminal, stderr is JSON lines only and stdout the ready line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLI, alive, wait_for
from harness import free_port_base

pytestmark = pytest.mark.e2e
HEADER = ("process", "state", "pid", "uptime", "restarts", "last exit", "gpus", "ports", "probe")


class Screen:
    """A tmux server of our own (its own socket, our environment), one window 160 x 50."""

    def __init__(self, tmp_path: Path) -> None:
        self.socket = f"lmcs-{uuid.uuid4().hex[:8]}"
        self.tmp = tmp_path
        self.gone = False  # hang_up() killed the server

    def tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=20)
        return done.stdout

    def start(self, *args: str) -> None:
        env = {
            "LMCACHE_SUPERVISE_STATE_ROOT": str(self.tmp / "state"),
            "LMCACHE_SUPERVISE_CACHE_DIR": os.environ["LMCACHE_SUPERVISE_CACHE_DIR"],
            "TERM": "xterm-256color",
        }
        words = ["env", *(f"{k}={v}" for k, v in env.items()), CLI, "up", "demo", *args]
        # The shell stays after the command so its exit code and last frame can be read.
        command = f"{shlex.join(words)}; echo EXIT=$?; sleep 60"
        subprocess.run(
            # A deep history: with --logs the children's lines scroll the ready line out of the
            # default 2,000 lines when the box is slow to read the screen.
            [
                "tmux",
                "-L",
                self.socket,
                "start-server",
                ";",
                "set-option",
                "-g",
                "history-limit",
                "100000",
                ";",
                "new-session",
                "-d",
                "-x",
                "160",
                "-y",
                "50",
                command,
            ],
            check=True,
            timeout=20,
            env={**os.environ, "TERM": "xterm-256color"},
        )

    def text(self) -> str:
        return self.tmux("capture-pane", "-p", "-S", "-")  # the whole history, not only the visible screen

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.text().splitlines() if line.strip()]

    def hang_up(self) -> None:
        """The terminal goes away (a closed window, a dropped ssh): tmux SIGHUPs what runs in it."""
        self.tmux("kill-server")
        self.gone = True

    def close(self) -> None:
        """Ctrl-C first (the orderly stop, whose exit code the shell prints), then the server."""
        if self.gone:
            return
        if "EXIT=" not in self.text():
            self.tmux("send-keys", "C-c")
            wait_for(lambda: "EXIT=" in self.text(), 60, what="up to stop on Ctrl-C")
        self.tmux("kill-server")


@pytest.fixture
def screen(tmp_path: Path) -> Iterator[Screen]:
    s = Screen(tmp_path)
    try:
        yield s
    finally:
        s.close()


def wait_ready(screen: Screen) -> None:
    try:
        wait_for(lambda: "ready: OpenAI API" in screen.text() or "EXIT=" in screen.text(), 60, what="ready")
    finally:
        if "ready: OpenAI API" not in screen.text():
            print(screen.text()[-5000:])  # shown by pytest on failure: what the terminal said instead


def header_rows(lines: list[str]) -> list[str]:
    return [line for line in lines if all(word in line for word in HEADER)]


def test_the_panel_one_ready_line_no_child_output_and_an_ordered_stop(screen: Screen) -> None:
    base = free_port_base()
    screen.start("--set", f"ports.base={base}", "--set", "workers.decode.stop_timeout_s=5")
    wait_ready(screen)
    # The panel redraws in place: after a few refreshes there is still one table.
    wait_for(lambda: "now ready" in screen.text(), 10, what="the panel's stage line")
    lines = screen.lines()
    assert len(header_rows(lines)) == 1, "\n".join(lines)
    assert [line for line in lines if line.startswith("ready:")] == [
        f"ready: OpenAI API at http://127.0.0.1:{base}/v1 (model demo) in "
        + lines[[line.startswith("ready:") for line in lines].index(True)].rsplit(" in ", 1)[1]
    ]
    for name in ("frontend", "decode", "prefill"):
        assert any(line.lstrip().startswith(name) and "healthy" in line for line in lines), "\n".join(lines)
    # Nothing a child printed: Dynamo's own lines carry their timestamps and levels, or a name prefix.
    assert not any(" | " in line or " INFO " in line or "dynamo_runtime" in line for line in lines), (
        "\n".join(lines)
    )

    screen.tmux("send-keys", "C-c")
    wait_for(lambda: "EXIT=" in screen.text(), 60, what="the orderly stop")
    lines = screen.lines()
    assert "EXIT=0" in lines, "\n".join(lines)
    stops = [line.split("] ", 1)[1] for line in lines if line.startswith("[") and " stopped" in line]
    assert [s.split()[0] for s in stops] == ["prefill", "decode", "frontend", "deployment"], stops
    assert len(header_rows(lines)) == 1 and "now stopped" in screen.text()
    assert sum(line.startswith("ready:") for line in lines) == 1


def test_logs_interleaves_the_children_with_their_names(screen: Screen) -> None:
    base = free_port_base()
    screen.start("--logs", "--set", f"ports.base={base}")
    wait_ready(screen)
    # Names are padded to the longest (docker-compose style): "decode   | ...".
    prefixed = [re.compile(rf"^{name} +\| ", re.M) for name in ("frontend", "decode", "prefill")]
    wait_for(lambda: all(p.search(screen.text()) for p in prefixed), 20, what="lines prefixed by each name")
    assert sum(line.startswith("ready:") for line in screen.lines()) == 1
    assert not header_rows(screen.lines())  # the lines scroll: no panel redrawn over them
    screen.tmux("send-keys", "C-c")
    wait_for(lambda: "EXIT=" in screen.text(), 60, what="the orderly stop")
    assert "EXIT=0" in screen.lines()


def test_without_a_terminal_stderr_is_json_events_and_stdout_the_ready_line(tmp_path: Path) -> None:
    base = free_port_base()
    env = {**os.environ, "LMCACHE_SUPERVISE_STATE_ROOT": str(tmp_path / "state")}
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [CLI, "up", "demo", "--set", f"ports.base={base}"], stdout=stdout, stderr=stderr, env=env
        )
    try:
        wait_for(lambda: b"ready:" in out.read_bytes() or proc.poll() is not None, 60, what="ready")
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.read_text().splitlines() == [
        f"ready: OpenAI API at http://127.0.0.1:{base}/v1 (model demo) in "
        + out.read_text().split(" in ", 1)[1].strip()
    ]
    events = [json.loads(line) for line in err.read_text().splitlines()]
    assert {"process starting", "deployment ready", "deployment stopped"} <= {e["event"] for e in events}


def test_closing_the_terminal_stops_everything_and_reload_still_works(screen: Screen, tmp_path: Path) -> None:
    """On a terminal SIGHUP is a hang-up, not a reload: a closed window must not leave a deployment
    running unseen. ``reload`` goes over the control socket, so it still works there."""
    base = free_port_base()
    screen.start("--set", f"ports.base={base}", "--set", "workers.decode.stop_timeout_s=5")
    wait_ready(screen)
    env = {**os.environ, "LMCACHE_SUPERVISE_STATE_ROOT": str(tmp_path / "state")}
    done = subprocess.run([CLI, "reload", "-d", "demo"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "reloaded demo: nothing changed" in done.stdout, done.stderr
    status = subprocess.run(
        [CLI, "status", "-d", "demo", "--json"], env=env, capture_output=True, text=True, timeout=30
    )
    pid_file = tmp_path / "state" / "demo" / "supervisor.pid"
    pids = [int(pid_file.read_text().split()[0])]
    pids += [p["pid"] for p in json.loads(status.stdout)["processes"] if p["pid"]]
    assert len(pids) == 4 and all(alive(pid) for pid in pids), pids  # the supervisor and its three
    screen.hang_up()
    wait_for(lambda: not any(alive(pid) for pid in pids), 60, what="everything to stop after the hang-up")
    assert not pid_file.exists()  # an orderly exit lets go of it
    decode_log = (tmp_path / "state" / "demo" / "logs" / "decode.log").read_text(errors="replace")
    assert "Received shutdown signal" in decode_log  # SIGTERM and Dynamo's drain, not a SIGKILL
