"""What a user waits for before anything runs: ``check demo``, and ``up demo`` from exec to its first spawn.

* ``check demo``: wall time of the whole command (interpreter start, imports, plan, every probe,
  the table), exit 0 expected.
* exec → first spawn: from just before ``Popen`` of ``up demo`` to the timestamp of the supervisor's
  first ``process starting`` event (its JSON log on stderr; both wall clock, well under a second
  apart). What lies between is the CLI's start-up and preflight, which nothing supervised can hide.
  The deployment is then stopped (SIGTERM, the orderly shutdown).

The worker-interpreter probe is cached across runs (``supervisor/host/cache.py``), so the first run
of a fresh cache pays it and every later one does not. Each measurement gets a cache directory of its
own: one cold run (reported as ``*_cold_ms``), then the warm runs whose median is the figure, which is
what a user sees on every start but the first after an install.

Compare two revisions side by side, interleaved run by run so both see the same machine load::

    .venv/bin/python scripts/benchkit/startup.py --against 938aee9 --repeats 9

(the other revision is checked out in a temporary git worktree and run from this venv with
``PYTHONPATH``; a revision older than ``edc093f`` needs ``pip install structlog`` in the venv.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: make scripts/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness
from harness import CLI

from benchkit.common import ROOT, BenchError, free_port_base, percentile, stop_group
from benchkit.demo import FAST_STOP, first_spawn, supervised_series


def _env(workdir: Path, tree: Path | None) -> dict[str, str]:
    env = {
        **os.environ,
        "LMCACHE_SUPERVISE_STATE_ROOT": str(workdir / "state"),
        "LMCACHE_SUPERVISE_CACHE_DIR": str(workdir / "cache"),
    }
    env.pop("LMCACHE_SUPERVISE_DEBUG", None)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return env


def _command(tree: Path | None) -> list[str]:
    """This checkout's installed command, or another tree's package run by this venv's Python."""
    # -P: no cwd on sys.path (it would find this checkout's package first); PYTHONPATH names the tree.
    return [CLI] if tree is None else [sys.executable, "-P", "-m", "supervisor"]


CPU_S: list[float] = []  # CPU seconds (user + system, the command and its children) of each check_once


def check_once(workdir: Path, tree: Path | None = None, base: int | None = None) -> float:
    """Seconds of one ``check demo`` (on a free port base, so a running demo does not fail it: ``base``
    while it is free, the same flags run after run as for a user). Its CPU seconds are appended to
    CPU_S: on a shared, busy machine they move far less than the wall time."""
    base = free_port_base(harness.port_offsets(), prefer=base)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(
        [*_command(tree), "check", "demo", "--set", f"ports.base={base}"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=_env(workdir, tree),
        timeout=120,
    )
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_S.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise BenchError(f"check demo exited {done.returncode}: {done.stderr[-1500:]}")
    return seconds


def spawn_once(workdir: Path, n: int, tree: Path | None = None, base: int | None = None) -> float:
    """Seconds from exec of ``up demo`` to its first ``process starting`` event (``base`` as for
    :func:`check_once`)."""
    base = free_port_base(harness.port_offsets(), prefer=base)
    err = workdir / f"up-{n}.err"
    with open(err, "wb") as stderr:
        launched_wall = time.time()
        proc = subprocess.Popen(
            [*_command(tree), "up", "demo", "--quiet-children", "--set", f"ports.base={base}", *FAST_STOP],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=_env(workdir, tree),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while b'"process starting"' not in err.read_bytes():
            if proc.poll() is not None:
                raise BenchError(
                    f"up demo exited {proc.returncode} before its first spawn: "
                    f"{err.read_text(errors='replace')[-1500:]}"
                )
            if time.monotonic() > deadline:
                raise BenchError("up demo spawned nothing within 60 s")
            time.sleep(0.02)
    finally:
        stop_group(proc, timeout_s=60)
    return first_spawn(err) - launched_wall


def precompile(tree: Path | None) -> None:
    """Byte-compile the package once, as a wheel install does: under PYTHONDONTWRITEBYTECODE (set on this
    machine) an editable checkout would otherwise compile every module from source on every start."""
    package = (tree or ROOT) / "supervisor"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True, capture_output=True)


def _ms(values: Sequence[float]) -> list[float]:
    return [round(v * 1000, 1) for v in values]


def measure(repeats: int, workdir: Path, tree: Path | None = None) -> dict[str, Any]:
    """Medians in ms of ``repeats`` warm runs each, after one cold run of each."""
    precompile(tree)
    check_dir, spawn_dir = workdir / "check", workdir / "spawn"
    check_dir.mkdir(parents=True, exist_ok=True)
    spawn_dir.mkdir(parents=True, exist_ok=True)
    # One port base per series: a user starts the same deployment with the same flags, so the
    # warm runs find the plan cache and the probe cache as a user's second start does.
    base = free_port_base(harness.port_offsets())
    check_cold = check_once(check_dir, tree, base)
    checks = [check_once(check_dir, tree, base) for _ in range(repeats)]
    spawn_cold = spawn_once(spawn_dir, 0, tree, base)
    spawns = [spawn_once(spawn_dir, i + 1, tree, base) for i in range(repeats)]
    return {
        "check_demo_ms": round(percentile(checks, 50) * 1000, 1),
        "check_demo_cold_ms": round(check_cold * 1000, 1),
        "first_spawn_ms": round(percentile(spawns, 50) * 1000, 1),
        "first_spawn_cold_ms": round(spawn_cold * 1000, 1),
        "startup_runs_ms": {"check_demo": _ms(checks), "first_spawn": _ms(spawns)},
    }


def compare(revision: str, repeats: int, workdir: Path) -> dict[str, Any]:
    """This checkout against ``revision``, run by run in turn (ABAB...), warm caches for both."""
    other = workdir / "other-tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(other), revision], check=True
    )
    try:
        trees: dict[str, Path | None] = {"this": None, revision: other}
        runs: dict[str, dict[str, list[float]]] = {
            name: {"check": [], "spawn": [], "cpu": []} for name in trees
        }
        base = free_port_base(harness.port_offsets())  # one for both: the same flags every run
        for name, tree in trees.items():  # warm each one's caches and bytecode once
            precompile(tree)
            (workdir / name).mkdir(parents=True, exist_ok=True)
            check_once(workdir / name, tree, base)
        for i in range(repeats):
            for name, tree in trees.items():
                runs[name]["check"].append(check_once(workdir / name, tree, base))
                runs[name]["cpu"].append(CPU_S[-1])
                runs[name]["spawn"].append(spawn_once(workdir / name, i, tree, base))
        return {
            name: {
                "check_demo_ms": round(percentile(r["check"], 50) * 1000, 1),
                "first_spawn_ms": round(percentile(r["spawn"], 50) * 1000, 1),
                "check_demo_cpu_ms": round(percentile(r["cpu"], 50) * 1000, 1),
                "runs_ms": {
                    "check_demo": _ms(r["check"]),
                    "first_spawn": _ms(r["spawn"]),
                    "check_cpu": _ms(r["cpu"]),
                },
            }
            for name, r in runs.items()
        }
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description="check demo and exec -> first spawn of up demo, in ms")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--against", metavar="REV", help="also run this git revision, interleaved")
    parser.add_argument(
        "--first-request",
        type=int,
        default=0,
        metavar="N",
        help="also N starts of up demo to its first successful request (benchkit/demo.py), this tree only",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="lmcs-startup-"))
    load = os.getloadavg()[0]
    result = compare(args.against, args.repeats, workdir) if args.against else measure(args.repeats, workdir)
    if args.first_request:
        ups = supervised_series(args.first_request, workdir)
        result["demo_first_request_s"] = percentile([up["seconds"] for up in ups], 50)
        result["demo_runs"] = ups
    print(
        json.dumps(
            {**result, "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
