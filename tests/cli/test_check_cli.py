"""`lmcache-supervise check` end to end: the installed command, real probes, exit codes and output."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import CLI

from supervisor.host.facts import port_facts
from supervisor.host.gpu import NO_DRIVER, gpu_facts

# Offsets from ports.base that the built-in profiles bind (frontend, health ports, metrics, NIXL).
OFFSETS = (0, 81, 82, 90, 200, 216)


def free_base() -> int:
    """A ports.base whose planned ports are all free now (tests run beside other deployments)."""
    for _ in range(200):
        base = random.randrange(20000, 30000, 10)
        if all(port_facts("127.0.0.1", base + off).free for off in OFFSETS):
            return base
    raise RuntimeError("no free port base")


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LMCACHE_SUPERVISE_STATE_ROOT": str(tmp_path / "state"), "COLUMNS": "200"}
    return subprocess.run([CLI, "check", *args], capture_output=True, text=True, env=env, timeout=300)


def as_json(done: subprocess.CompletedProcess[str]) -> list[dict[str, str]]:
    rows = json.loads(done.stdout)
    assert all(set(row) == {"check", "status", "message", "hint"} for row in rows)
    return rows


def test_demo_passes_on_this_machine_in_both_forms(tmp_path: Path) -> None:
    base = str(free_base())
    table = run(tmp_path, "demo", "--set", f"ports.base={base}")
    assert table.returncode == 0, table.stdout + table.stderr
    assert "0 failed" in table.stdout and "discovery" in table.stdout and table.stderr == ""
    rows = as_json(run(tmp_path, "demo", "--set", f"ports.base={base}", "--json"))
    assert [r["check"] for r in rows] == [
        "arch",
        "gpu",
        "gpu-health",
        "lmcache-config",
        "host-memory",
        "disk",
        "ports",
        "remote-cache",
        "memlock",
        "shm",
        "software",
        "engine",
        "model",
        "discovery",
        "transport",
    ]
    assert {r["status"] for r in rows} == {"ok"}


def test_a_port_held_by_this_test_fails_demo_and_names_this_process(tmp_path: Path) -> None:
    base = free_base()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", base + 81))
        holder.listen(1)
        done = run(tmp_path, "demo", "--set", f"ports.base={base}", "--json")
    assert done.returncode == 3
    (row,) = [r for r in as_json(done) if r["status"] == "fail"]
    assert row["check"] == "ports"
    assert row["message"].startswith(
        f"port {base + 81} (decode system on 127.0.0.1) is taken by pid {os.getpid()} ("
    )
    assert done.stderr.startswith("lmcache-supervise: preflight failed: ports: ")


def test_a_missing_etcd_binary_fails_check_with_exit_3(tmp_path: Path) -> None:
    absent = tmp_path / "bin" / "etcd"
    done = run(
        tmp_path,
        "demo",
        "--set",
        f"ports.base={free_base()}",
        "--set",
        'discovery.backend="etcd"',
        "--set",
        f'infra.etcd.binary="{absent}"',
        "--json",
    )
    assert done.returncode == 3, done.stdout + done.stderr
    (row,) = [r for r in as_json(done) if r["status"] == "fail"]
    assert (row["check"], row["message"]) == ("software", f"etcd cannot start: {absent} does not exist")
    assert f"preflight failed: software: etcd cannot start: {absent} does not exist" in done.stderr


def test_an_lmcache_config_file_is_read_and_a_misread_value_fails_check(tmp_path: Path) -> None:
    config = tmp_path / "lmcache.yaml"
    config.write_text("max_local_disk_size: 10GB\n")
    done = run(
        tmp_path,
        "disagg",
        "--set",
        f"ports.base={free_base()}",
        "--set",
        f'workers.prefill.env.LMCACHE_CONFIG_FILE="{config}"',
        "--skip-check",
        "gpu",
        "--skip-check",
        "software",
        "--skip-check",
        "model",
        "--json",
    )
    assert done.returncode == 3, done.stdout + done.stderr
    (row,) = [r for r in as_json(done) if r["status"] == "fail"]
    assert row["check"] == "lmcache-config"
    assert row["message"].startswith(
        f"prefill: LMCACHE_CONFIG_FILE {config}: max_local_disk_size: expected a number"
    )


def test_disagg_without_a_driver_exits_3_with_the_nvml_message_and_hint(tmp_path: Path) -> None:
    if gpu_facts().error != NO_DRIVER:
        pytest.skip("this machine has an NVIDIA driver; the no-driver path is covered with a fake NVML")
    done = run(tmp_path, "disagg", "--set", f"ports.base={free_base()}", "--json")
    assert done.returncode == 3
    (gpu,) = [r for r in as_json(done) if r["check"] == "gpu"]
    assert (gpu["status"], gpu["message"]) == ("fail", "no NVIDIA driver found (NVML library not loadable)")
    assert "nvidia-smi" in gpu["hint"]
    assert "preflight failed: gpu: no NVIDIA driver found (NVML library not loadable)" in done.stderr
    table = run(tmp_path, "disagg", "--set", f"ports.base={free_base()}")
    assert table.returncode == 3 and "no NVIDIA driver found" in table.stdout and "FAIL" in table.stdout


def test_a_real_redis_without_maxmemory_warns_and_its_password_stays_hidden(
    tmp_path: Path, redis_factory
) -> None:
    server = redis_factory("--requirepass", "pw-8c1f")
    url = f"redis://:pw-8c1f@127.0.0.1:{server.port}"
    skips = [a for name in ("gpu", "software", "model", "host-memory") for a in ("--skip-check", name)]
    done = run(
        tmp_path,
        "disagg",
        "--set",
        f"ports.base={free_base()}",
        "--set",
        f'lmcache.remote.url="{url}"',
        *skips,
        "--json",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (remote,) = [r for r in as_json(done) if r["check"] == "remote-cache"]
    assert remote["status"] == "warn" and "maxmemory is 0" in remote["message"]
    assert f"redis://:***@127.0.0.1:{server.port}" in remote["message"]
    assert "pw-8c1f" not in done.stdout + done.stderr
    server.stop()  # the same check with the server gone is a failure
    down = run(
        tmp_path,
        "disagg",
        "--set",
        f"ports.base={free_base()}",
        "--set",
        f'lmcache.remote.url="{url}"',
        *skips,
        "--json",
    )
    assert down.returncode == 3 and "connection refused" in down.stdout and "pw-8c1f" not in down.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("demo", "--skip-check", "gpus"), "Invalid value for '--skip-check'"),
        (("no-such-profile",), "no-such-profile"),
    ],
)
def test_bad_input_exits_2(tmp_path: Path, args: tuple[str, ...], words: str) -> None:
    done = run(tmp_path, *args)
    assert done.returncode == 2 and words in done.stderr
    assert "Traceback" not in done.stderr


def test_an_lmcache_server_l1_larger_than_ram_exits_3_naming_the_server(tmp_path: Path) -> None:
    done = run(
        tmp_path,
        "demo-lmcache",
        "--set",
        f"ports.base={free_base()}",
        "--set",
        "lmcache.server.l1_size_gb=100000.0",
        "--skip-check",
        "software",  # `lmcache` need not be on PATH for this
        "--skip-check",
        "ports",  # +555/+556 are not among OFFSETS: a busy one must not add a second failure
        "--json",
    )
    assert done.returncode == 3, done.stdout + done.stderr
    (row,) = [r for r in as_json(done) if r["status"] == "fail"]
    assert row["check"] == "host-memory" and "lmcache-server: 100000 GB L1" in row["message"]
    assert done.stderr.startswith("lmcache-supervise: preflight failed: host-memory: ")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
