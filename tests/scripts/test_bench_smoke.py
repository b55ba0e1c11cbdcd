"""scripts/bench.py runs end to end at its smallest size and says every figure; Ctrl-C leaves nothing.

Benchmarks are not timed tests: nothing here asserts a speed, only that each key holds a number.
The leak check in conftest covers every process the bench starts (they inherit the test's marker).
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import wait_for

pytestmark = pytest.mark.e2e  # it runs the real Dynamo demo and pip-installs supervisord once
BENCH = str(Path(__file__).resolve().parents[2] / "scripts" / "bench.py")
NUMBERS = (
    "detect_p50_ms",
    "detect_p99_ms",
    "respawn_p50_ms",
    "respawn_p99_ms",
    "respawn_p50_under_log_flood_ms",
    "respawn_p99_under_log_flood_ms",
    "respawn_p99_log_stalled_ms",
    "gate_p50_ms",
    "gate_p99_ms",
    "demo_first_request_s",
    "script_poll_first_request_s",
    "down_overhead_ms",
    "check_demo_ms",
    "first_spawn_ms",
    "check_demo_cold_ms",
    "first_spawn_cold_ms",
)
# Documented as nullable: supervisord when pip cannot install it (offline); the sleep-20 script
# is skipped below the full run.
NULLABLE = ("supervisord_respawn_p50_ms", "script_sleep_first_request_s")


def is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def test_tiny_run_reports_every_key_as_a_number() -> None:
    done = subprocess.run(
        [sys.executable, BENCH, "--tiny", "--json"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    for key in NUMBERS:
        assert is_number(result.get(key)), (key, result.get(key))
    for key in NULLABLE:
        assert key in result and (result[key] is None or is_number(result[key])), (key, result.get(key))
    if result["supervisord_respawn_p50_ms"] is None:
        assert result["notes"]["supervisord"]  # a reason, not a silent gap
    assert result["script_sleep_first_request_s"] is None and "skipped" in result["notes"]["script_sleep"]
    assert result["availability_ha_failed"] is None and "skipped" in result["notes"]["availability"]
    for key in ("rss_mb", "cpu_percent"):
        assert result[key] and all(k.isdigit() and is_number(v) for k, v in result[key].items()), result[key]
    assert set(result["rss_mb"]) == set(result["cpu_percent"])


def test_interrupted_run_leaves_no_process_behind(tmp_path: Path) -> None:
    err = tmp_path / "bench.err"
    with open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, BENCH, "--tiny", "--json"], stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        # Mid-run, with a supervisor, its children and the bench's own helpers all alive.
        wait_for(lambda: b"gate:" in err.read_bytes() or proc.poll() is not None, 60, what="the gate stage")
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, err.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "interrupted" in err.read_text()
