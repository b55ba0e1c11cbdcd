"""Fault soak: a real ``up demo`` under a steady client while its processes are killed and frozen.

    .venv/bin/python scripts/soak.py [--duration 300] [--seed N] [--gap MIN MAX] [--json]
    .venv/bin/python scripts/soak.py --ha [--kills 10] [--min-requests 1000] [--targets ...] [--json]

For ``--duration`` seconds, two client threads send small chat requests (5 s timeout) to the demo's
frontend on loopback, while frontend, decode and prefill are SIGKILLed, or SIGSTOPped and later
SIGCONTed, at random (soakkit/faults.py says which and why). Afterwards it checks what
docs/reliability.md promises: the deployment is ready; every SIGKILL and every long stop was
answered by exactly one restart (and nothing else restarted); requests failed only inside fault
windows; no process escaped the supervisor's tree, none is left after ``down``, nor any
PROMETHEUS_MULTIPROC_DIR; the supervisor's descriptors did not grow and its RSS drift stays small.
Prints the figures (``--json``: one JSON object); exit status 0 only when every check held.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness import NAMES, Deployment
from soakkit import ha
from soakkit.faults import Client, Injector
from soakkit.judge import Timeline, coverage, judge, outside_windows, restart_counts, stop_verdicts

WARMUP_S = 3.0  # client traffic before the baseline sample: first-request allocations are not drift
TAIL_S = 5.0  # client traffic after the final recovery: proof that the deployment serves again
RECOVERY_TIMEOUT_S = 90.0
RSS_DRIFT_LIMIT_MIB = 16.0
MIB = 1024 * 1024


class Sampler:
    """The supervisor's descriptors and RSS once a second, for the peak."""

    def __init__(self, deployment: Deployment) -> None:
        self._dep = deployment
        self._stop = threading.Event()
        self.samples: list[tuple[float, int, int]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.samples.append((time.monotonic(), *self._dep.usage()))
            except Exception:  # the supervisor is going away: sampling ends with it
                return


def _recovery(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "median": round(statistics.median(values), 2) if values else 0.0,
        "max": round(max(values), 2) if values else 0.0,
    }


def run_soak(*, duration_s: float, seed: int, gap_s: tuple[float, float], workdir: Path) -> dict[str, Any]:
    """Run one soak and return its figures; ``figures["ok"]`` is the verdict, ``problems`` the reasons."""
    rng = random.Random(seed)
    problems: list[str] = []
    with Deployment(workdir) as dep:
        dep.wait_ready()
        client = Client(dep)
        client.start()
        with Sampler(dep) as sampler:
            time.sleep(WARMUP_S)  # fixed warm-up traffic, not a wait for a condition
            fds0, rss0 = dep.usage()
            started = time.monotonic()
            injector = Injector(dep, rng, gap_s=gap_s)
            faults = injector.run(until=started + duration_s)
            try:
                dep.wait(dep.all_ready, RECOVERY_TIMEOUT_S, "the final recovery")
            except TimeoutError as exc:
                problems.append(str(exc))
            ready_at_end = dep.all_ready()
            time.sleep(TAIL_S)  # fixed tail of traffic after recovery (requests must all pass)
            requests = client.stop()
            end = time.monotonic()
            fds1, rss1 = dep.usage()
        orphans_during = dep.orphans()
        dirs_during = dep.multiproc_dirs()
        exit_code = dep.stop()
        time.sleep(0.5)  # init reaps orphans lazily; close() below waits up to 5 s more anyway
        orphans_after = [p.pid for p in dep.marked()]
        stale_after = dep.multiproc_dirs()
        leaked = dep.close()
        events = dep.snapshot()

    judged = judge(faults, Timeline(events))
    calm = outside_windows(requests, judged, end)
    outside = [r for r in calm if r.error is not None]
    restarts = restart_counts(judged, events)
    problems += stop_verdicts(judged)
    for name, counts in restarts.items():
        if counts["expected"] != counts["observed"]:
            problems.append(f"{name}: {counts['observed']} restarts, faults explain {counts['expected']}")
    if not ready_at_end:
        problems.append("the deployment was not ready at the end")
    if outside:
        problems.append(f"{len(outside)} requests failed outside fault windows, first: {outside[0].error}")
    if orphans_during or orphans_after or leaked:
        problems.append(f"orphans: during {orphans_during}, after shutdown {orphans_after}, killed {leaked}")
    if dirs_during != sorted(NAMES):
        problems.append(f"PROMETHEUS_MULTIPROC_DIRs during the run: {dirs_during}")
    if stale_after:
        problems.append(f"PROMETHEUS_MULTIPROC_DIRs left after shutdown: {stale_after}")
    if fds1 > fds0:
        problems.append(f"the supervisor's descriptors grew from {fds0} to {fds1}")
    if (rss1 - rss0) / MIB > RSS_DRIFT_LIMIT_MIB:
        problems.append(
            f"the supervisor's RSS grew {(rss1 - rss0) / MIB:.1f} MiB (limit {RSS_DRIFT_LIMIT_MIB:g})"
        )
    if exit_code != 0:
        problems.append(f"up exited with {exit_code} after SIGTERM")

    kinds: dict[str, dict[str, int]] = {}
    for j in judged:
        kind = j.fault.kind if j.fault.kind == "SIGKILL" else f"SIGSTOP {'long' if j.fault.long else 'short'}"
        kinds.setdefault(kind, {n: 0 for n in NAMES})[j.fault.target] += 1
    failed = [r for r in requests if r.error is not None]
    return {
        "duration_s": duration_s,
        "seed": seed,
        "faults": {"total": len(judged), **kinds},
        "requests": {
            "sent": len(requests),
            "failed": len(failed),
            "outside_windows": len(calm),
            "failed_outside_windows": len(outside),
            "outside_examples": [r.error for r in outside[:3]],
        },
        "time_in_fault_windows": round(coverage(judged, started, end), 3),
        "restarts": restarts,
        "liveness_restarts": sum(j.liveness for j in judged),
        "recovery_s": {
            kind: _recovery(
                [j.recovery_s for j in judged if j.recovery_s is not None and j.fault.kind == kind]
            )
            for kind in ("SIGKILL", "SIGSTOP")
        },
        "supervisor": {
            "fds_start": fds0,
            "fds_end": fds1,
            "fd_drift": fds1 - fds0,
            "rss_start_mib": round(rss0 / MIB, 1),
            "rss_end_mib": round(rss1 / MIB, 1),
            "rss_drift_mib": round((rss1 - rss0) / MIB, 2),
            "rss_max_mib": round(max([s[2] for s in sampler.samples] + [rss1]) / MIB, 1),
        },
        "orphans": len(orphans_during) + len(orphans_after) + len(leaked),
        "stale_multiproc_dirs": len(stale_after),
        "exit_code": exit_code,
        "ready_at_end": ready_at_end,
        "problems": problems,
        "ok": not problems,
        "fault_log": [
            {
                "at_s": round(j.fault.injected - started, 1),
                "kind": j.fault.kind,
                "target": j.fault.target,
                "held_s": round(j.fault.held_s, 1),
                "restarted": j.restarted,
                "liveness": j.liveness,
                "recovery_s": None if j.recovery_s is None else round(j.recovery_s, 2),
            }
            for j in judged
        ],
    }


def print_figures(figures: dict[str, Any]) -> None:
    f, r, s = figures["faults"], figures["requests"], figures["supervisor"]
    print(f"soak: {figures['duration_s']:g} s, seed {figures['seed']}: {'OK' if figures['ok'] else 'FAILED'}")
    kinds = [
        f"{kind}: " + ",".join(f"{n}={c}" for n, c in per.items())
        for kind, per in f.items()
        if kind != "total"
    ]
    print(f"  faults injected        {f['total']}  " + "  ".join(kinds))
    print(
        f"  requests sent          {r['sent']}  failed {r['failed']} (all inside fault windows: "
        f"{'yes' if not r['failed_outside_windows'] else 'NO'})"
    )
    print(
        f"  failed outside windows {r['failed_outside_windows']} of {r['outside_windows']} sent outside "
        f"them (windows cover {figures['time_in_fault_windows']:.0%} of the run)"
    )
    print(
        "  restarts (obs/expected) "
        + "  ".join(f"{n} {c['observed']}/{c['expected']}" for n, c in figures["restarts"].items())
        + f"  (liveness: {figures['liveness_restarts']})"
    )
    for kind, rec in figures["recovery_s"].items():
        print(
            f"  recovery after {kind:<8} median {rec['median']} s  max {rec['max']} s  "
            f"({rec['count']} faults)"
        )
    print(f"  supervisor fds         {s['fds_start']} -> {s['fds_end']} (drift {s['fd_drift']:+d})")
    print(
        f"  supervisor RSS         {s['rss_start_mib']} -> {s['rss_end_mib']} MiB "
        f"(drift {s['rss_drift_mib']:+} MiB, peak {s['rss_max_mib']} MiB)"
    )
    print(f"  orphans                {figures['orphans']}")
    print(f"  stale multiproc dirs   {figures['stale_multiproc_dirs']}")
    print(f"  exit code after down   {figures['exit_code']}")
    for problem in figures["problems"]:
        print(f"  PROBLEM: {problem}")


def print_ha(figures: dict[str, Any]) -> None:
    single, ha = figures["single"], figures["ha"]
    print(f"availability ({figures['clients']} streaming clients): {'OK' if figures['ok'] else 'FAILED'}")
    print(
        f"  demo    (1 decode + 1 prefill, no migration): {single['kills']} SIGKILLs, {single['failed']} of "
        f"{single['sent']} requests failed ({single['failed_per_kill']} requests and "
        f"{single['failure_window_per_kill_s']} s of errors per SIGKILL)"
    )
    print(
        f"  demo-ha (2 + 2 replicas, migration 3):        {ha['kills']} SIGKILLs "
        f"({', '.join(ha['targets'])}), restart --all, reload: "
        f"{ha['failed']} of {ha['sent']} requests failed"
    )
    for phase, p in ha["phases"].items():
        print(f"    {phase:<12} {p['seconds']:>6} s  {p['failed']} of {p['sent']} failed")
    for kill in ha["per_kill"]:
        if kill["failed"]:
            print(
                f"      SIGKILL {kill['target']} at {kill['at_s']} s: {kill['failed']} failed {kill['reasons']}"
            )
    fe = ha["frontend_restart"]
    print(
        f"  frontend restart (one frontend): {fe['failed']} of {fe['sent']} failed, refusal window "
        f"{fe['refusal_window_s']} s"
    )
    for problem in figures["problems"]:
        print(f"  PROBLEM: {problem}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of faults (default 300)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time-based, printed)")
    parser.add_argument(
        "--gap",
        type=float,
        nargs=2,
        default=(3.0, 10.0),
        metavar=("MIN", "MAX"),
        help="seconds between faults (default 3 10)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument(
        "--ha", action="store_true", help="the availability run: demo vs demo-ha under streaming load"
    )
    parser.add_argument("--kills", type=int, default=10, help="--ha: SIGKILLs of demo-ha worker replicas")
    parser.add_argument("--min-requests", type=int, default=1000, help="--ha: requests the demo-ha run sends")
    parser.add_argument(
        "--targets",
        nargs="+",
        choices=ha.HA_WORKERS,
        default=list(ha.HA_WORKERS),
        metavar="REPLICA",
        help="--ha: the replicas SIGKILLed in turn (default: decode-0 prefill-0 decode-1 prefill-1; "
        "e.g. --targets prefill-0 prefill-1)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, state)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    workdir = Path(tempfile.mkdtemp(prefix="lmcache-soak-"))
    if args.ha:
        try:
            figures = ha.run(
                workdir, kills=args.kills, min_requests=args.min_requests, targets=tuple(args.targets)
            )
        finally:
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        print(json.dumps(figures, indent=2)) if args.json else print_ha(figures)
        return 0 if figures["ok"] else 1
    try:
        figures = run_soak(duration_s=args.duration, seed=seed, gap_s=tuple(args.gap), workdir=workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print_figures(figures)
        if args.keep:
            print(f"  work directory         {workdir}")
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
