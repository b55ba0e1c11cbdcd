"""Bench children that report their own instants into the bench's FIFO (stdlib only).

    children.py gate --port P --fifo F       /health 503 until SIGUSR1, then 200; /live always 200
    children.py slowstop --delay S --fifo F  exits S seconds after SIGTERM
    children.py health --port P              /health 200 {"status": "ready"} and /live 200, always
    children.py flood --rate-mb R            R MB/s of log lines on stdout, for ever

Markers are one line each, ``TAG PID WALL [MORE]`` with wall-clock times (see common.py on clocks):
``up`` once the child can take its signal (handler installed, server listening), ``flip`` when the
gate child turns healthy (``MORE`` = its monotonic time), ``stopped`` when the slow child exits
(``WALL`` = when SIGTERM arrived, ``MORE`` = when it exits).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import threading
import time
from typing import Any


class _Health(http.server.BaseHTTPRequestHandler):
    """Keep-alive HTTP/1.1, like the Dynamo system server: one connection per prober, reused."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle on, the second waits for the client's
    # delayed ACK (40 ms on Linux), a stall of this fixture that real health servers do not have.
    disable_nagle_algorithm = True
    healthy = True

    def do_GET(self) -> None:
        if self.path == "/live":
            code, body = 200, {"status": "live"}
        elif self.path == "/health":
            code, body = (200, {"status": "ready"}) if self.healthy else (503, {"status": "notready"})
        else:
            code, body = 404, {"error": "not found"}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def _serve(port: int, handler: type[_Health]) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()


def _say(fd: int, tag: str, *more: float) -> None:
    os.write(fd, (" ".join([tag, str(os.getpid()), *(f"{v:.6f}" for v in more)]) + "\n").encode())


def gate(port: int, fifo: str) -> None:
    class Gate(_Health):
        healthy = False

    fd = os.open(fifo, os.O_WRONLY)
    # SIGUSR1 is blocked before the server thread starts (threads inherit the mask) and taken with
    # sigwait: a Python handler would run only once the kernel happened to pick the main thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    _serve(port, Gate)
    _say(fd, "up", time.time())
    signal.sigwait({signal.SIGUSR1})
    wall, mono = time.time(), time.monotonic()  # the instant /health turns 200
    Gate.healthy = True
    _say(fd, "flip", wall, mono)
    while True:
        signal.pause()


def slowstop(delay_s: float, fifo: str) -> None:
    fd = os.open(fifo, os.O_WRONLY)

    def term(signum: int, frame: Any) -> None:
        received = time.time()
        time.sleep(delay_s)
        _say(fd, "stopped", received, time.time())
        os._exit(0)

    signal.signal(signal.SIGTERM, term)
    _say(fd, "up", time.time())
    while True:
        signal.pause()


def flood(rate_mb: float) -> None:
    """Write ``rate_mb`` MB/s of log lines to stdout, paced every 10 ms, for ever."""
    line = b"x" * 1023 + b"\n"
    per_tick = max(1, int(rate_mb * 1_000_000 / 100 / len(line)))
    chunk = line * per_tick
    out = os.fdopen(1, "wb", buffering=0)
    next_tick = time.monotonic()
    while True:
        out.write(chunk)
        next_tick += 0.01
        delay = next_tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def health(port: int) -> None:
    _serve(port, _Health)
    while True:
        signal.pause()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("gate", "slowstop", "health", "flood"))
    parser.add_argument("--rate-mb", type=float, default=50.0)
    parser.add_argument("--port", type=int)
    parser.add_argument("--fifo")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    if args.mode == "gate":
        gate(args.port, args.fifo)
    elif args.mode == "flood":
        flood(args.rate_mb)
    elif args.mode == "slowstop":
        slowstop(args.delay, args.fifo)
    else:
        health(args.port)


if __name__ == "__main__":
    main()
