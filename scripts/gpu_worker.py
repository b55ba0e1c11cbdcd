"""A GPU fixture worker for scripts/gpu_validate.py: holds real CUDA memory and answers like Dynamo.

Needs PyTorch with CUDA (it is the only script here that imports torch). Modes::

    gpu_worker.py --gib 8 [--port P] [--grandchild-gib 4 --grandchild-hold-s 3]
    gpu_worker.py --gib 10 --no-http          # a plain holder: prints one JSON line once allocated
    gpu_worker.py --devices                   # prints the CUDA devices it sees as JSON, then exits

As a worker it allocates ``--gib`` GiB on its one visible device (``CUDA_VISIBLE_DEVICES`` picks it,
exactly as the supervisor's plan sets it for vLLM), then serves what the supervisor probes on a
Dynamo worker: ``GET /health`` -> ``{"status": "ready", ...}`` and ``GET /live`` on ``--port``
(default ``$DYN_SYSTEM_PORT``, the port the plan gives a Dynamo worker). The /health body also
says what this process sees: ``device_count``, the device ``uuid``, its pid and its grandchild's.

``--grandchild-gib`` starts a grandchild that holds its own CUDA memory in a NEW session, so a
group kill misses it (a stand-in for an engine process that left the group): once the worker is gone
it keeps the memory ``--grandchild-hold-s`` seconds more, then exits. The worker turns ready only
after the grandchild has allocated, so the supervisor's walk of the tree (when the startup probe
passes) finds it, adopts it as a stray and stops it with the worker. ``--grandchild-ignore-term`` makes
it ignore SIGTERM, like an engine process whose teardown takes long: it then keeps its memory the
hold after the worker's death before it exits. ``--grandchild-orphan`` starts
it through an intermediate process that exits at once, so it is init's before any walk: a holder
the supervisor never sees.

Every process of this script exits by itself after ``--max-lifetime-s``: nothing it starts can
outlive a crashed driver by more than that.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, ClassVar

GIB = 1024**3
START = time.monotonic()
_LAUNCH_AND_LEAVE = "import subprocess, sys; subprocess.Popen(sys.argv[1:], start_new_session=True)"


def _log(message: str) -> None:
    # stderr: the supervisor's log pipe for a supervised worker (stdout is the holder's protocol).
    print(
        f"gpu_worker[{os.getpid()}] {time.monotonic() - START:7.3f}s {message}", file=sys.stderr, flush=True
    )


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise SystemExit(f"gpu_worker: needs PyTorch with CUDA ({exc})") from exc
    return torch


def _allocate(gib: float) -> tuple[Any, dict[str, Any]]:
    """Allocate and touch ``gib`` GiB on cuda:0; returns the tensor (keep it alive) and what CUDA sees."""
    torch = _torch()

    if not torch.cuda.is_available():
        raise SystemExit("gpu_worker: CUDA is not available to torch (is a GPU visible?)")
    count = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    tensor = torch.empty(int(gib * GIB), dtype=torch.uint8, device="cuda:0")
    tensor.fill_(1)  # touch every page: NVML then shows the memory as used by this pid
    torch.cuda.synchronize()
    seen = {
        "pid": os.getpid(),
        "device_count": count,
        "uuid": str(props.uuid),
        "name": props.name,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "allocated_bytes": int(tensor.numel()),
        "torch": torch.__version__,
    }
    return tensor, seen


def _devices() -> dict[str, Any]:
    """Every CUDA device this process sees, in CUDA's order, with its UUID (no memory allocated)."""
    torch = _torch()

    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append(
            {
                "cuda_index": i,
                "name": props.name,
                "uuid": str(props.uuid),
                "total_bytes": int(props.total_memory),
                "pci_bus_id": getattr(props, "pci_bus_id", None),
            }
        )
    return {
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_device_order": os.environ.get("CUDA_DEVICE_ORDER"),
        "devices": out,
    }


class _Health(http.server.BaseHTTPRequestHandler):
    body: ClassVar[dict[str, Any]] = {}  # set once before serving; read-only afterwards

    def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
        if self.path.startswith("/health"):
            payload = json.dumps(self.body).encode()
        elif self.path.startswith("/live"):
            payload = b"{}"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass  # probes every 100 ms would flood the worker's log


def _start_grandchild(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], int]:
    """Start the escaped grandchild and wait until it holds its memory; returns it and its pid."""
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        "--gib",
        str(args.grandchild_gib),
        "--grandchild-of",
        str(os.getpid()),
        "--hold-after-parent-s",
        str(args.grandchild_hold_s),
        "--max-lifetime-s",
        str(args.max_lifetime_s),
    ]
    if args.grandchild_ignore_term:
        argv.append("--ignore-term")
    if args.grandchild_orphan:  # an intermediate starts it and exits: it is reparented at once
        argv = [sys.executable, "-c", _LAUNCH_AND_LEAVE, *argv]
    # start_new_session: outside the worker's process group, so a killpg misses it.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # written by the holder once it has allocated
    if not line:
        raise SystemExit(f"gpu_worker: grandchild {proc.pid} exited before allocating (code {proc.wait()})")
    proc.stdout.close()
    if args.grandchild_orphan:
        proc.wait()
    return proc, json.loads(line)["pid"]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not): the holder watches the worker, not its own parent."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def _grandchild(args: argparse.Namespace) -> None:
    """Hold memory; once the worker is gone, hold it ``--hold-after-parent-s`` more, then exit."""
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    tensor, seen = _allocate(args.gib)
    print(json.dumps(seen), flush=True)
    _log(f"grandchild holds {args.gib:g} GiB for parent {args.grandchild_of}")
    deadline = START + args.max_lifetime_s
    while _alive(args.grandchild_of) and time.monotonic() < deadline:
        time.sleep(0.02)  # a 20 ms poll is precise enough for the record
    _log(f"worker gone; keeping the memory {args.hold_after_parent_s:g} s more")
    time.sleep(max(0.0, min(args.hold_after_parent_s, deadline - time.monotonic())))
    del tensor
    _log("grandchild exits")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="GiB to allocate on the visible GPU")
    parser.add_argument("--port", type=int, help="health port (default: $DYN_SYSTEM_PORT)")
    parser.add_argument("--no-http", action="store_true", help="hold only: print one JSON line, no server")
    parser.add_argument("--devices", action="store_true", help="print the CUDA devices as JSON and exit")
    parser.add_argument("--grandchild-gib", type=float, default=0.0)
    parser.add_argument("--grandchild-hold-s", type=float, default=3.0)
    parser.add_argument("--grandchild-orphan", action="store_true", help="start it through an intermediate")
    parser.add_argument("--grandchild-ignore-term", action="store_true", help="it ignores SIGTERM")
    parser.add_argument("--ignore-term", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grandchild-of", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hold-after-parent-s", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--max-lifetime-s", type=float, default=300.0)
    args = parser.parse_args(argv)

    if args.devices:
        print(json.dumps(_devices()), flush=True)
        return
    if args.grandchild_of is not None:
        _grandchild(args)
        return

    grandchild_pid = None
    if args.grandchild_gib > 0:
        _, grandchild_pid = _start_grandchild(args)
    tensor, seen = _allocate(args.gib)
    seen["grandchild_pid"] = grandchild_pid
    _log(f"holding {args.gib:g} GiB on CUDA_VISIBLE_DEVICES={seen['cuda_visible_devices']} ({seen['uuid']})")
    if args.no_http:
        print(json.dumps(seen), flush=True)
    else:
        port = args.port if args.port is not None else int(os.environ["DYN_SYSTEM_PORT"])
        _Health.body = {"status": "ready", **seen}
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        _log(f"serving /health on 127.0.0.1:{port}")
    # Until SIGTERM/SIGKILL (default actions end the process, and the driver frees the memory).
    time.sleep(max(0.0, START + args.max_lifetime_s - time.monotonic()))
    del tensor


if __name__ == "__main__":
    main()
