"""Known lines in children's output become hints; a real port clash names the port and its holder."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from supervisor.control import hints as diagnose
from supervisor.control import status as statusview
from supervisor.control.hints import Hint, PortHolder, Severity
from supervisor.engine.states import DeploymentState, DeploymentStatus, ProcessState, ProcessStatus
from supervisor.plan.spec import Role

# Captured from a Dynamo 1.6.1 mocker whose DYN_SYSTEM_PORT was taken (colours and all).
DYNAMO_BIND = (
    "\x1b[2m2026-11-28T03:03:10.956021Z\x1b[0m \x1b[31mERROR\x1b[0m \x1b[2mdynamo_runtime::system_status_server"
    "\x1b[0m\x1b[2m:\x1b[0m Failed to bind to address 127.0.0.1:24081: Failed to bind to address: Address "
    "already in use (os error 98)"
)
DYNAMO_BIND_NO_PORT = (
    "\x1b[31mERROR\x1b[0m dynamo_runtime::distributed: System status server startup failed "
    "error=Failed to bind to address: Address already in use (os error 98)"
)


def kinds(hints: tuple[Hint, ...]) -> list[str]:
    return [h.kind for h in hints]


def test_each_known_line_becomes_its_hint() -> None:
    lines = [
        "INFO starting",
        DYNAMO_BIND,
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)",
        "pynvml.NVMLError_DriverNotLoaded: Driver Not Loaded",
        "[2025-05-01 10:00:00,000] LMCache WARNING: PrometheusLogger instance already created with different metadata.",
        (
            "WARNING 05-01 10:00:00 [prometheus.py:41] Found PROMETHEUS_MULTIPROC_DIR was set by user. This "
            "directory must be wiped between vLLM runs or you will find inaccurate metrics."
        ),
        "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization`",
    ]
    hints = diagnose.scan(lines)
    assert kinds(hints) == [
        "port-in-use",
        "cuda-oom",
        "nvml",
        "lmcache-prometheus-logger",
        "prometheus-multiproc-dir",
        "kv-cache-memory",
    ]
    by_kind = {h.kind: h for h in hints}
    assert by_kind["port-in-use"].port == 24081
    assert "\x1b" not in by_kind["port-in-use"].line  # ANSI colours stripped from the evidence
    assert by_kind["port-in-use"].severity is Severity.ERROR
    assert by_kind["lmcache-prometheus-logger"].severity is Severity.INFO
    assert "LMCACHE_LOG_LEVEL" in by_kind["lmcache-prometheus-logger"].message
    assert "empties" in by_kind["prometheus-multiproc-dir"].message
    assert by_kind["cuda-oom"].to_json()["severity"] == "error"


def test_repeats_fold_into_one_hint_and_the_line_naming_the_port_wins() -> None:
    hints = diagnose.scan([DYNAMO_BIND_NO_PORT, DYNAMO_BIND, DYNAMO_BIND, DYNAMO_BIND_NO_PORT])
    assert len(hints) == 1 and hints[0].port == 24081
    assert diagnose.scan(["all good", "", "nothing to see"]) == ()


def test_ports_are_read_from_the_usual_spellings() -> None:
    assert (
        diagnose.port_in(
            "OSError: [Errno 98] error while attempting to bind on address ('127.0.0.1', 8000): "
            "address already in use"
        )
        == 8000
    )
    assert diagnose.port_in("listen tcp [::1]:2379: bind: address already in use") == 2379
    assert diagnose.port_in("could not bind port 5600: Address already in use") == 5600
    assert diagnose.port_in("Address already in use") is None


def test_attribution_names_the_holder_and_drops_a_clash_that_is_over() -> None:
    hint = diagnose.scan([DYNAMO_BIND])
    stranger = diagnose.attribute_ports(
        hint, ports={"system": 24081}, holder=lambda p: PortHolder(42, "nginx")
    )
    assert stranger[0].message == "port 24081 (system) was already in use, held by pid 42 (nginx)"
    over = diagnose.attribute_ports(
        hint, ports={"system": 24081}, holder=lambda p: PortHolder(7, "x", ours=True)
    )
    assert over == ()
    gone = diagnose.attribute_ports(hint, ports={}, holder=lambda p: None)
    assert "nobody now" in gone[0].message
    # No port in the line: the process's own ports held by someone else are named.
    bare = diagnose.scan([DYNAMO_BIND_NO_PORT])
    holders = {18081: PortHolder(None, None), 18601: PortHolder(9, "me", ours=True)}
    named = diagnose.attribute_ports(bare, ports={"system": 18081, "bootstrap": 18601}, holder=holders.get)
    assert [h.port for h in named] == [18081] and "another user" in named[0].message


def test_a_real_port_clash_in_a_log_names_the_port_and_this_test_as_its_holder(
    tmp_path: Path, make_spec, make_plan
) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        spec = make_spec("decode", role=Role.DECODE, ports={"system": port})
        Path(spec.log_file).parent.mkdir(parents=True)
        filler = "x" * 200 + "\n"
        Path(spec.log_file).write_text(
            filler * 1000 + DYNAMO_BIND.replace("24081", str(port)) + "\n" + filler
        )
        plan = make_plan(spec)
        proc = ProcessStatus(
            name="decode",
            role="decode",
            state=ProcessState.RUNNING,
            required=True,
            pid=None,
            started_wall=None,
            uptime_s=1.0,
            restarts=0,
            last_exit=None,
            last_probe=None,
            reason="",
        )
        status = DeploymentStatus(
            name="test",
            state=DeploymentState.READY,
            base_url="",
            model="m",
            ready_since_wall=None,
            processes=(proc,),
        )
        hints = statusview.gather_hints(status, plan)["decode"]
        assert len(hints) == 1
        assert hints[0].message.startswith(
            f"port {port} (system) was already in use, held by pid {os.getpid()}"
        )
        assert "python" in hints[0].message  # the holder's command line, shortened
    finally:
        holder.close()


def test_only_the_tail_of_a_big_log_is_read(tmp_path: Path) -> None:
    log = tmp_path / "big.log"
    log.write_text(DYNAMO_BIND + "\n" + "y" * (diagnose.TAIL_BYTES + 10) + "\nlast line\n")
    lines = statusview.read_tail(str(log))
    assert lines == ["last line"]  # the cut first line is dropped, the old clash is out of reach
    assert statusview.read_tail(str(tmp_path / "missing.log")) == []
