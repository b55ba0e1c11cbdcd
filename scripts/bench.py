#!/usr/bin/env python3
"""How fast lmcache-supervise notices a crash, gates a dependent, serves the demo, and what it costs.

    .venv/bin/python scripts/bench.py            # the full run (~8 min), a table
    .venv/bin/python scripts/bench.py --quick    # small sizes, under a minute
    .venv/bin/python scripts/bench.py --json     # one JSON object on stdout instead of the table
    .venv/bin/python scripts/bench.py --out docs/benchmarks.json --svg docs/benchmarks-overhead.svg

Each figure is measured side by side with its anchor in the same run: supervisord (installed by
pip into ``.bench/supervisord-venv`` on first use) for respawn, the upstream launch script (with
its ``sleep 20``, and with a curl loop instead) for the demo. Definitions are in the docstrings of
``scripts/benchkit/*.py`` and in ``docs/benchmarks.md``. Progress goes to stderr.

JSON keys (milliseconds unless named otherwise): detect_p50_ms, detect_p99_ms, respawn_p50_ms,
respawn_p99_ms, respawn_p50_under_log_flood_ms, respawn_p99_under_log_flood_ms (and detect_*,
respawn_max_* of the same; the *_log_stalled_ms ones with every log file stalled),
supervisord_respawn_p50_ms, gate_p50_ms, gate_p99_ms, demo_first_request_s,
script_sleep_first_request_s, script_poll_first_request_s, rss_mb and cpu_percent (objects keyed by
the number of children), down_overhead_ms, check_demo_ms and first_spawn_ms (medians of warm runs:
``scripts/benchkit/startup.py``); more beside them (breakdowns, machine, load, sizes, cold runs).
Only ``supervisord_respawn_p50_ms`` (pip could not install supervisor, e.g. offline) and
``script_sleep_first_request_s`` (skipped by --quick and --tiny) and the ``availability_*`` keys
(skipped by --tiny) may be null; ``notes`` says why. Availability (scripts/soakkit/ha.py, the same as
``scripts/soak.py --ha``): availability_single_failed_per_kill, availability_single_error_s_per_kill
(demo: one worker per role), availability_ha_sent, availability_ha_failed (demo-ha: SIGKILLs,
restart --all and a reload of every worker), availability_frontend_refusal_s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchkit import crash, demo, gate, overhead, report, startup
from benchkit.common import BenchError, Reaper, percentile, workdir
from soakkit import ha


@dataclass(frozen=True)
class Sizes:
    """How much of each measurement a mode runs."""

    kills: int
    supervisord_kills: int
    gate_rounds: int
    demo_repeats: int
    sleep_script: bool
    idle_ns: tuple[int, ...]
    idle_window_s: float
    idle_settle_s: float
    stop_children: int
    stop_repeats: int
    ha_kills: int = 0  # availability (soakkit/ha.py): SIGKILLs of demo-ha replicas; 0 skips it
    ha_requests: int = 0
    startup_repeats: int = 9


FULL = Sizes(
    kills=200,
    supervisord_kills=20,
    gate_rounds=50,
    demo_repeats=3,
    sleep_script=True,
    idle_ns=(1, 8, 32, 128),
    idle_window_s=60.0,
    idle_settle_s=6.0,
    stop_children=8,
    stop_repeats=5,
    ha_kills=10,
    ha_requests=1000,
)
# One probe period (5 s) per window: a shorter one would catch a varying share of the probe ticks.
QUICK = Sizes(
    kills=30,
    supervisord_kills=3,
    gate_rounds=10,
    demo_repeats=1,
    sleep_script=False,
    idle_ns=(1, 8, 32, 128),
    idle_window_s=5.0,
    idle_settle_s=0.5,
    stop_children=4,
    stop_repeats=2,
    ha_kills=4,
    ha_requests=300,
    startup_repeats=3,
)
# For the smoke test: every key, the least time (the figures are not meant to be read).
TINY = Sizes(
    kills=5,
    supervisord_kills=1,
    gate_rounds=3,
    demo_repeats=1,
    sleep_script=False,
    idle_ns=(1, 4),
    idle_window_s=1.0,
    idle_settle_s=0.2,
    stop_children=3,
    stop_repeats=1,
    startup_repeats=1,
)


#: The log-flood crash figures: the victim and this many more children, each writing FLOOD_MB MB/s.
FLOODERS = 2
FLOOD_MB = 50.0


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return percentile(values, 50)


class LoadSampler:
    """The 1-minute load average every few seconds while the bench runs: its figures are only as
    good as the machine was quiet, and before/after alone would miss a neighbour's burst."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), name="load", daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(timeout=1.0)
        self.samples.append(os.getloadavg()[0])
        return {"before": self.samples[0], "after": self.samples[-1], "max": max(self.samples)}


def run_crash(sizes: Sizes, tmp: Path) -> dict[str, Any]:
    """Crash detection and respawn: idle, under a log flood, and with every log file stalled."""
    result: dict[str, Any] = {}
    progress(f"crash: SIGKILL the child {sizes.kills} times")
    ours = crash.ours(sizes.kills, workdir(tmp, "crash"))
    result.update(
        detect_p50_ms=ours["detect"]["p50"],
        detect_p99_ms=ours["detect"]["p99"],
        respawn_p50_ms=ours["running"]["p50"],
        respawn_p99_ms=ours["running"]["p99"],
        spawned_p50_ms=ours["spawned"]["p50"],
        spawned_p99_ms=ours["spawned"]["p99"],
    )

    # The same kills while every child (the victim and FLOODERS more) writes FLOOD_MB MB/s of output,
    # then with every log file stalled (a FIFO nobody reads: the log writer blocks in its open).
    for key, stalled in (("under_log_flood", False), ("log_stalled", True)):
        progress(f"crash: {sizes.kills} kills, {FLOODERS + 1} children at {FLOOD_MB:g} MB/s each, {key}")
        flooded = crash.ours(
            sizes.kills, workdir(tmp, f"crash-{key}"), flooders=FLOODERS, rate_mb=FLOOD_MB, stalled=stalled
        )
        result.update(
            {
                f"detect_p50_{key}_ms": flooded["detect"]["p50"],
                f"detect_p99_{key}_ms": flooded["detect"]["p99"],
                f"respawn_p50_{key}_ms": flooded["running"]["p50"],
                f"respawn_p99_{key}_ms": flooded["running"]["p99"],
                f"respawn_max_{key}_ms": flooded["running"]["max"],
            }
        )
    result.update(log_flood_children=FLOODERS + 1, log_flood_mb_per_s_each=FLOOD_MB)

    return result


def run(sizes: Sizes, tmp: Path) -> dict[str, Any]:
    notes: dict[str, str] = {}
    result = run_crash(sizes, tmp)

    progress(f"crash: the same under supervisord, {sizes.supervisord_kills} times")
    theirs = crash.supervisord(sizes.supervisord_kills, workdir(tmp, "supervisord"))
    if theirs["running"] is None:
        notes["supervisord"] = theirs["skipped"]
        result.update(
            supervisord_respawn_p50_ms=None, supervisord_respawn_p99_ms=None, supervisord_version=None
        )
    else:
        result.update(
            supervisord_respawn_p50_ms=theirs["running"]["p50"],
            supervisord_respawn_p99_ms=theirs["running"]["p99"],
            supervisord_version=theirs["version"],
        )

    progress(f"gate: flip a dependency healthy {sizes.gate_rounds} times")
    gated = gate.measure(sizes.gate_rounds, workdir(tmp, "gate"))
    result.update(
        gate_p50_ms=gated["total"]["p50"],
        gate_p99_ms=gated["total"]["p99"],
        gate_probe_p50_ms=gated["probe"]["p50"],
        gate_engine_p50_ms=gated["engine"]["p50"],
    )

    progress(f"startup: check demo, and up demo to its first spawn, {sizes.startup_repeats} times each")
    started = startup.measure(sizes.startup_repeats, workdir(tmp, "startup"))
    result.update(started)

    # The demo runs below share one probe cache, warmed here: their figure is a start like every start
    # but the first after an install (startup.measure above reports the cold one as *_cold_ms).
    warm = workdir(tmp, "probe-warm")
    os.environ["LMCACHE_SUPERVISE_CACHE_DIR"] = str(warm / "cache")
    startup.check_once(warm)

    ups, polls, sleeps, rss, spawns = [], [], [], [], []
    progress(f"demo: up demo, {sizes.demo_repeats} starts after one that fills the plan cache")
    for up in demo.supervised_series(sizes.demo_repeats, workdir(tmp, "demo-up")):
        ups.append(up["seconds"])
        rss.append(up["supervisor_rss_mb"])
        spawns.append(up["first_spawn_s"])
    for i in range(sizes.demo_repeats):
        progress(
            f"demo: curl-loop script{', sleep-20 script' if sizes.sleep_script else ''} "
            f"({i + 1}/{sizes.demo_repeats})"
        )
        polls.append(demo.scripted("disagg_lmcache_poll.sh", workdir(tmp, "demo-poll"))["seconds"])
        if sizes.sleep_script:
            sleeps.append(demo.scripted("disagg_lmcache.sh", workdir(tmp, "demo-sleep"))["seconds"])
    if not sleeps:
        notes["script_sleep"] = "skipped in --quick/--tiny (it takes over 20 s by construction)"
    result.update(
        demo_first_request_s=median(ups),
        script_poll_first_request_s=median(polls),
        script_sleep_first_request_s=median(sleeps) if sleeps else None,
        demo_supervisor_rss_mb=median(rss),
        demo_first_spawn_s=median(spawns),
        demo_runs_s={"supervisor": ups, "script_poll": polls, "script_sleep": sleeps},
    )

    cpu, mem, guardian = {}, {}, {}
    for n in sizes.idle_ns:
        progress(f"overhead: {n} idle children, {sizes.idle_window_s:g} s window")
        idle = overhead.idle(n, sizes.idle_window_s, workdir(tmp, f"idle{n}"), settle_s=sizes.idle_settle_s)
        cpu[str(n)], mem[str(n)], guardian[str(n)] = (
            idle["cpu_percent"],
            idle["rss_mb"],
            idle["guardian_rss_mb"],
        )
    result.update(cpu_percent=cpu, rss_mb=mem, guardian_rss_mb=guardian)

    progress(
        f"shutdown: {sizes.stop_children} children stopping in 0.1..{sizes.stop_children / 10:g} s, "
        f"{sizes.stop_repeats} times"
    )
    stops = [overhead.shutdown(sizes.stop_children, workdir(tmp, "stop")) for _ in range(sizes.stop_repeats)]
    best = sorted(stops, key=lambda s: s["overhead_ms"])[len(stops) // 2]  # the median run
    result.update(
        down_overhead_ms=best["overhead_ms"],
        down_ms=best["down_ms"],
        slowest_child_ms=best["slowest_child_ms"],
    )
    if sizes.ha_kills:
        progress(f"availability: demo vs demo-ha, {sizes.ha_kills} SIGKILLs, restart --all, reload")
        avail = ha.run(workdir(tmp, "availability"), kills=sizes.ha_kills, min_requests=sizes.ha_requests)
        single, replicated = avail["single"], avail["ha"]
        result.update(
            availability_single_failed_per_kill=single["failed_per_kill"],
            availability_single_error_s_per_kill=single["failure_window_per_kill_s"],
            availability_ha_sent=replicated["sent"],
            availability_ha_failed=replicated["failed"],
            availability_frontend_refusal_s=replicated["frontend_restart"]["refusal_window_s"],
            availability=avail,
        )
    else:
        notes["availability"] = "skipped in --tiny (tests/e2e/test_ha.py runs its short version)"
        result.update(
            availability_single_failed_per_kill=None,
            availability_single_error_s_per_kill=None,
            availability_ha_sent=None,
            availability_ha_failed=None,
            availability_frontend_refusal_s=None,
        )
    result["notes"] = notes
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    mode.add_argument(
        "--tiny", action="store_true", help="smallest sizes (the smoke test): figures not meaningful"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", type=Path, help="also write the JSON object to this file")
    parser.add_argument("--svg", type=Path, help="also write the overhead plot (SVG) to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) and say where")
    parser.add_argument(
        "--crash-only",
        action="store_true",
        help="only the crash figures (idle, under a log flood, log directory stalled); implies --json",
    )
    args = parser.parse_args()
    sizes, name = (TINY, "tiny") if args.tiny else (QUICK, "quick") if args.quick else (FULL, "full")

    # SIGTERM unwinds like Ctrl-C, through every finally: supervisors stopped, the rest swept.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    reaper = Reaper()
    tmp = Path(tempfile.mkdtemp(prefix="lmcs-bench-"))
    started, load = time.monotonic(), LoadSampler()
    try:
        result = run_crash(sizes, tmp) if args.crash_only else run(sizes, tmp)
    except BenchError as exc:
        print(f"bench: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; stopping what it started", file=sys.stderr)
        return 130
    finally:
        leftovers = reaper.sweep()
        if leftovers:
            print(f"bench: killed what was left: {leftovers}", file=sys.stderr)
        if args.keep:
            print(f"bench: work directory kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result.update(
        mode=name,
        sizes=asdict(sizes),
        machine=report.machine(),
        load={k: round(v, 2) for k, v in load.stop().items()},
        duration_s=round(time.monotonic() - started, 1),
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.svg:
        args.svg.write_text(report.svg(result))
    print(json.dumps(result, indent=2) if args.json or args.crash_only else report.table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
