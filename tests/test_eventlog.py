"""The supervisor's event log: one JSON object per line off a terminal, a sink for up's panel, levels,
secrets masked at the sink, and a sink that fails never stopping the caller."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest

from supervisor import eventlog
from supervisor.eventlog import log


@pytest.fixture(autouse=True)
def restore() -> Iterator[None]:
    saved = (log.sink, log.level)
    yield
    log.sink, log.level = saved


def test_json_lines_carry_event_fields_level_and_a_utc_timestamp() -> None:
    stream = io.StringIO()
    eventlog.configure(json=True, stream=stream)
    log.info("process starting", process="decode", pid=7)
    log.debug("not shown at info")
    (line,) = stream.getvalue().splitlines()
    event = json.loads(line)
    assert list(event) == ["event", "process", "pid", "level", "timestamp"]
    assert (
        event["event"] == "process starting" and event["level"] == "info" and event["timestamp"].endswith("Z")
    )


def test_a_sink_gets_every_event_at_its_level_and_a_failing_sink_is_dropped() -> None:
    seen: list[dict[str, object]] = []
    eventlog.configure(level="warning", sink=seen.append)
    log.info("quiet")
    log.warning("GPU memory still held", process="decode", url="redis://:hunter2@h:1")
    assert [e["event"] for e in seen] == ["GPU memory still held"] and seen[0]["url"] == "redis://:***@h:1"

    def broken(event: dict[str, object]) -> None:
        raise OSError("terminal gone")

    eventlog.configure(sink=broken)
    log.error("still fine")  # no exception reaches the supervisor


def test_capture_sees_everything_and_exception_keeps_a_masked_traceback() -> None:
    eventlog.configure(level="error", sink=lambda e: None)
    with log.capture() as captured:
        log.debug("low", n=1)
        try:
            raise RuntimeError("lm://x:hunter2@h:1 unreachable")
        except RuntimeError:
            log.exception("observer failed")
    assert [e["event"] for e in captured] == ["low", "observer failed"]
    text = str(captured[1]["exception"])
    assert "RuntimeError" in text and "hunter2" not in text


def test_the_terminal_line_is_short_and_readable() -> None:
    line = eventlog.render_line(
        {
            "event": "reload",
            "restart": ["decode"],
            "level": "info",
            "timestamp": "2026-11-30T17:06:20.123456Z",
        }
    )
    assert line == "17:06:20 info     reload  restart=['decode']"
