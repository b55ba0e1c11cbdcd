"""Streaming chat clients that judge availability the way an API user does; shared by the soak,
the bench and the e2e tests.

    load = StreamLoad("http://127.0.0.1:18000", model="demo", clients=4, max_tokens=40)
    load.start(); ...faults...; outcomes = load.stop()

Each of ``clients`` threads sends one streaming chat completion after another (``stream: true``)
and reads the server-sent events to the end. A request counts as FAILED when:
- the answer is not 200 (a refused connection, a 503 while no worker of a type is registered),
- the stream carries an error (an ``event: error`` line, or a ``data:`` object with an ``error``),
- the stream ends without any choice carrying a ``finish_reason`` (a worker died mid-stream and the
  frontend closed the stream, or the connection broke), or it is not over within ``timeout_s``.
So a request that Dynamo migrated to another worker succeeds only if its stream still finished.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Outcome:
    """One request: when it was sent and when it ended (monotonic), and why it failed (None: ok)."""

    started: float
    ended: float
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


def judge_stream(lines: Iterable[str]) -> str | None:
    """Why a server-sent-event stream of a chat completion failed, or None when it finished cleanly."""
    finish: str | None = None
    event = ""
    for line in lines:
        if not line:
            event = ""
            continue
        if line.startswith("event:"):
            event = line.removeprefix("event:").strip()
            if event == "error":
                return "error event in the stream"
            continue
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            break
        try:
            chunk = json.loads(data)
        except ValueError:
            return f"unparsable stream data: {data[:120]}"
        if not isinstance(chunk, dict):
            return f"unexpected stream data: {data[:120]}"
        if chunk.get("error") is not None:
            return f"error in the stream: {str(chunk['error'])[:200]}"
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict) and choice.get("finish_reason"):
                finish = str(choice["finish_reason"])
    return None if finish else "stream ended without a finish reason"


def stream_chat(
    client: httpx.Client,
    url: str,
    *,
    model: str,
    max_tokens: int,
    timeout_s: float,
    prompt: str = "Hello there, how are you today?",
) -> str | None:
    """Send one streaming chat completion to ``url`` (the API base); None when it succeeded."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    deadline = time.monotonic() + timeout_s
    try:
        with client.stream(
            "POST", f"{url.rstrip('/')}/v1/chat/completions", json=body, timeout=timeout_s
        ) as resp:
            if resp.status_code != 200:
                resp.read()
                return f"HTTP {resp.status_code}: {resp.text[:200]}"

            def lines() -> Iterable[str]:
                for line in resp.iter_lines():
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("stream not finished in time")
                    yield line

            return judge_stream(lines())
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:300]


class StreamLoad:
    """``clients`` threads of back-to-back streaming requests until :meth:`stop`."""

    def __init__(
        self,
        url: str,
        *,
        model: str,
        clients: int = 4,
        max_tokens: int = 40,
        timeout_s: float = 30.0,
        pause_s: float = 0.0,
        fail_pause_s: float = 0.1,
    ) -> None:
        self.url, self.model = url, model
        self.max_tokens, self.timeout_s, self.pause_s = max_tokens, timeout_s, pause_s
        # A client that got an error waits a little before the next try, as real clients back off:
        # without it a refusing server (fast 503s) turns a 2 s outage into thousands of "requests".
        self.fail_pause_s = fail_pause_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._outcomes: list[Outcome] = []
        self._threads = [
            threading.Thread(target=self._loop, daemon=True, name=f"streamload-{i}") for i in range(clients)
        ]

    def __enter__(self) -> StreamLoad:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> list[Outcome]:
        """Stop sending, let the requests in flight end, and return every outcome in start order."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 5)
        return self.outcomes()

    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return sorted(self._outcomes, key=lambda o: o.started)

    def counts(self) -> tuple[int, int]:
        """``(sent, failed)`` so far."""
        with self._lock:
            return len(self._outcomes), sum(o.error is not None for o in self._outcomes)

    def wait_sent(self, n: int, timeout_s: float) -> bool:
        """Until at least ``n`` requests ended (a deadline wait, for short test runs)."""
        deadline = time.monotonic() + timeout_s
        while self.counts()[0] < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _loop(self) -> None:
        with httpx.Client(trust_env=False) as client:  # loopback only: no proxy from the environment
            while not self._stop.is_set():
                started = time.monotonic()
                error = stream_chat(
                    client, self.url, model=self.model, max_tokens=self.max_tokens, timeout_s=self.timeout_s
                )
                with self._lock:
                    self._outcomes.append(Outcome(started, time.monotonic(), error))
                pause = self.pause_s if error is None else max(self.pause_s, self.fail_pause_s)
                if pause:
                    self._stop.wait(pause)


def failure_window_s(outcomes: list[Outcome], *, gap_s: float = 0.5) -> float:
    """Seconds in which clients saw errors: failed requests, each stretched by ``gap_s`` (a client's
    retry gap and more), merged where they overlap. Fast refusals count as the outage they are."""
    total, start, end = 0.0, 0.0, float("-inf")
    for o in sorted((o for o in outcomes if o.error is not None), key=lambda o: o.started):
        if o.started > end:
            total += max(0.0, end - start) if end > start else 0.0
            start = o.started
        end = max(end, o.ended + gap_s)
    if end > start:
        total += end - start
    return total


def summary(outcomes: list[Outcome]) -> dict[str, object]:
    """Sent, failed, seconds with failures, and up to three failure reasons with their counts."""
    reasons: dict[str, int] = {}
    for o in outcomes:
        if o.error is not None:
            key = o.error.split(":")[0][:80]
            reasons[key] = reasons.get(key, 0) + 1
    return {
        "sent": len(outcomes),
        "failed": sum(reasons.values()),
        "failure_window_s": round(failure_window_s(outcomes), 2),
        "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:3]),
    }
