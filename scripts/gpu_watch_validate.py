"""Run the GPU health watcher on real NVIDIA GPUs and record what it saw and what it cost.

CI fakes NVML (tests/host/test_gpuwatch.py). This runs :class:`supervisor.host.gpuwatch.GpuWatcher`
against the real driver on every GPU of the machine for ``--seconds``, with a torch load on GPU 0
for part of that time (``--load-s``; needs PyTorch with CUDA, skipped without it), and checks:

* events are registered on every GPU (the mask, and that it includes Xid critical errors);
* every health counter is read on every GPU (values, the ones NVML calls unsupported, errors);
* no fatal or application fault is reported on a healthy machine (information, e.g. a power cap
  under load, is listed, not failed);
* the watcher costs under 1 % of one core (CPU time of this process over the watch, torch is a
  child process and not counted; plus the watcher threads' own CPU time from /proc);
* the kernel-log reader sees a new record: with root, a plain marker line (no Xid text: an Xid-like
  line could trip a real host monitor) is written to /dev/kmsg and must be counted;
* close() returns promptly while a wait is blocked.

It never injects a GPU fault and never changes a GPU setting::

    PYTHONPATH=. python scripts/gpu_watch_validate.py --out gpu-watch-out   # exit 0 = all held

Writes ``OUT/gpu-watch-validation.json``; exit 1 if an expectation failed, 2 if there is no NVML/GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from supervisor.host.gpuhealth import EVENT_XID, WATCHED_EVENTS, read_counters
from supervisor.host.gpuwatch import GpuWatcher

# Run as `PYTHONPATH=. python scripts/<this>.py` (docs/gpu-validation.md): no sys.path edits.
ROOT = Path(__file__).resolve().parents[1]

LOAD = """
import sys, time, torch
end = time.monotonic() + float(sys.argv[1])
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
n = 0
while time.monotonic() < end:
    for _ in range(20):
        a = (a @ a).clamp_(-1, 1)
    torch.cuda.synchronize()
    n += 20
print(n, flush=True)
"""


def log(message: str) -> None:
    print(f"[gpu_watch_validate {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Expect:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def __call__(self, held: bool, what: str, detail: Any = None) -> None:
        self.items.append({"held": bool(held), "what": what, "detail": detail})
        log(("OK   " if held else "FAIL ") + what + ("" if detail is None else f" -- {detail}"))


def thread_cpu_s(native_id: int | None) -> float | None:
    """utime + stime of one thread of this process, from /proc (None where it cannot be read)."""
    if native_id is None:
        return None
    try:
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def old_xid_lines() -> tuple[int, str | None]:
    """How many NVRM Xid records the kernel log holds from boot until now (read only)."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return 0, exc.strerror
    count = 0
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError:
                continue  # EPIPE: overwritten records
            if not record:
                break
            count += b"NVRM: Xid" in record
    finally:
        os.close(fd)
    return count, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-watch-out")
    parser.add_argument("--seconds", type=float, default=240.0, help="how long the watcher runs")
    parser.add_argument("--load-s", type=float, default=60.0, help="torch matmul load on GPU 0 (0: none)")
    parser.add_argument("--interval", type=float, default=10.0, help="counter read interval (the default)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"args": vars(args), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    expect = Expect()

    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 -- any failure means: no NVML here
        print(f"gpu_watch_validate: cannot run here: {exc}", file=sys.stderr)
        return 2
    count = pynvml.nvmlDeviceGetCount()
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    report["env"] = {
        "driver": pynvml.nvmlSystemGetDriverVersion(),
        "nvml_py": getattr(pynvml, "__version__", None),
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "gpus": [
            {
                "index": i,
                "name": pynvml.nvmlDeviceGetName(h),
                "uuid": pynvml.nvmlDeviceGetUUID(h),
                "bus": pynvml.nvmlDeviceGetPciInfo(h).busId,
                "supported_events": hex(pynvml.nvmlDeviceGetSupportedEventTypes(h)),
            }
            for i, h in enumerate(handles)
        ],
    }
    log(f"{count} GPU(s), driver {report['env']['driver']}")
    # One counter read per GPU, timed: what every periodic read costs.
    latencies = []
    for h in handles:
        t0 = time.perf_counter()
        for _ in range(20):
            read_counters(pynvml, h)
        latencies.append((time.perf_counter() - t0) / 20)
    report["counter_read_ms"] = [round(x * 1000, 2) for x in latencies]
    pynvml.nvmlShutdown()
    report["kmsg_xid_records_since_boot"], report["kmsg_history_error"] = old_xid_lines()

    watcher = GpuWatcher(range(count), counter_interval_s=args.interval, wait_ms=1000)
    faults: list[Any] = []
    t_start = time.monotonic()
    cpu_start = os.times()
    watcher.start()
    readings = watcher.readings()
    for r in readings:
        expect(
            r.events & EVENT_XID != 0,
            f"GPU {r.index}: registered for Xid events",
            {"mask": hex(r.events), "wanted": hex(WATCHED_EVENTS), "error": r.event_error},
        )
        c = r.counters
        expect(
            c is not None and not c.errors and not c.lost,
            f"GPU {r.index}: every counter answered or is unsupported",
            {"unsupported": c.unsupported if c else None, "errors": c.errors if c else None},
        )
    report["first_readings"] = [dataclasses.asdict(r) for r in readings]

    marker = f"lmcache-supervise gpu_watch_validate kmsg probe {uuid.uuid4().hex[:12]}"
    records_before = watcher.stats.kmsg_records
    kmsg_written = False
    time.sleep(1.0)  # the kmsg thread has opened and sought to the end
    try:
        with open("/dev/kmsg", "w") as kmsg:
            kmsg.write(marker + "\n")
        kmsg_written = True
    except OSError as exc:
        report["kmsg_write_error"] = exc.strerror

    load: subprocess.Popen[str] | None = None
    load_started = t_start + max(0.0, (args.seconds - args.load_s) / 2)
    load_output = ""
    watch_threads = [t for t in threading.enumerate() if t.name.startswith("gpuwatch")]
    while (now := time.monotonic()) < t_start + args.seconds:
        if load is None and args.load_s > 0 and now >= load_started:
            load = subprocess.Popen(
                [sys.executable, "-c", LOAD, str(args.load_s)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"},
            )
            log(f"load on GPU 0 for {args.load_s:g} s (pid {load.pid})")
        faults += watcher.faults(1.0)  # what the engine's bridge task does, through a worker thread
    wall = time.monotonic() - t_start
    cpu_end = os.times()
    thread_cpu = {t.name: thread_cpu_s(t.native_id) for t in watch_threads}
    t0 = time.monotonic()
    watcher.close()
    close_s = time.monotonic() - t0
    if load is not None:
        load_output = (load.communicate(timeout=120)[0] or "").strip()
    cpu = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
    stats = dataclasses.asdict(watcher.stats)
    report.update(
        wall_s=round(wall, 1),
        process_cpu_s=round(cpu, 3),
        process_cpu_pct_of_core=round(100 * cpu / wall, 3),
        watcher_thread_cpu_s=thread_cpu,
        close_s=round(close_s, 3),
        stats=stats,
        load={"matmuls": load_output, "rc": load.returncode if load else None},
        faults=[dataclasses.asdict(f) for f in faults],
        last_readings=[dataclasses.asdict(r) for r in watcher.readings()],
    )
    bad = [f for f in faults if f.finding.fault.value != "info"]
    expect(
        not bad,
        "no fatal or application fault on a healthy machine",
        [f.describe() for f in faults] or "no finding at all",
    )
    expect(
        stats["counter_reads"] >= count * int(args.seconds // args.interval),
        "counters read every interval on every GPU",
        stats["counter_reads"],
    )
    expect(stats["waits"] >= 0.8 * args.seconds, "the event wait looped (1 s timeout)", stats["waits"])
    expect(100 * cpu / wall < 1.0, "costs under 1 % of one core", f"{100 * cpu / wall:.3f} %")
    if kmsg_written:
        expect(
            stats["kmsg_records"] > records_before and stats["kmsg_error"] is None,
            "the kernel-log reader saw the new record",
            stats["kmsg_records"],
        )
    else:
        expect(False, "a marker could be written to /dev/kmsg", report.get("kmsg_write_error"))
    expect(close_s < 2.5, "close() returns while a wait is blocked", f"{close_s:.3f} s")
    if load is not None:
        expect(load.returncode == 0, "the torch load ran", load_output)
    report["expectations"] = expect.items
    (out / "gpu-watch-validation.json").write_text(json.dumps(report, indent=2, default=str))
    failed = [e["what"] for e in expect.items if not e["held"]]
    log(
        f"{len(expect.items) - len(failed)}/{len(expect.items)} held; cpu {100 * cpu / wall:.3f} % of a core "
        f"over {wall:.0f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
