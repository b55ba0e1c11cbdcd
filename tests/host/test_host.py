"""host.py through its real boundaries: real redis-server, sentinel and cluster nodes, sockets bound
here, real interpreters in subprocesses, real files. Fakes only for NVML (see test_host_gpu.py)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from conftest import wait_for
from proctools import free_port

from supervisor.host import facts as host
from supervisor.host import ports
from supervisor.host.facts import FactsRequest, InterpreterRequest, ModelRequest
from supervisor.host.redis import RemoteTarget, probe_remote
from supervisor.preflight.needs import parse_remote_url

VENV_PYTHON = sys.executable  # the project venv under `make test`: it has ai-dynamo, not vllm
TIMEOUT = 2.0


def target(url: str, **env: str) -> RemoteTarget:
    parsed, why = parse_remote_url(url, env)
    assert parsed is not None, why
    return parsed


# ------------------------------------------------------------------------------------------- redis


def test_plain_redis_answers_ping_and_reports_unbounded_maxmemory(redis_factory) -> None:
    server = redis_factory()
    found = probe_remote(target(f"redis://127.0.0.1:{server.port}"), TIMEOUT)
    assert found.reachable and found.problem is None
    assert found.maxmemory == 0 and found.policy == "noeviction"
    assert f"127.0.0.1:{server.port} answers PING" in found.detail


def test_redis_maxmemory_and_policy_are_read(redis_factory) -> None:
    server = redis_factory("--maxmemory", "10mb", "--maxmemory-policy", "allkeys-lru")
    found = probe_remote(target(f"redis://127.0.0.1:{server.port}/0"), TIMEOUT)
    assert found.reachable
    assert (found.maxmemory, found.policy) == (10 * 1024 * 1024, "allkeys-lru")


def test_redis_password_right_wrong_and_missing(redis_factory) -> None:
    server = redis_factory("--requirepass", "s3cret-pw")
    assert probe_remote(target(f"redis://:s3cret-pw@127.0.0.1:{server.port}"), TIMEOUT).reachable
    assert probe_remote(target(f"redis://default:s3cret-pw@127.0.0.1:{server.port}"), TIMEOUT).reachable
    wrong = probe_remote(target(f"redis://:nope-pw@127.0.0.1:{server.port}"), TIMEOUT)
    assert not wrong.reachable and "authentication failed" in (wrong.problem or "")
    assert "nope-pw" not in (wrong.problem or "")
    missing = probe_remote(target(f"redis://127.0.0.1:{server.port}"), TIMEOUT)
    assert not missing.reachable and "authentication failed (NOAUTH)" in (missing.problem or "")


def test_redis_down_is_connection_refused() -> None:
    port = free_port()
    found = probe_remote(target(f"redis://127.0.0.1:{port}"), TIMEOUT)
    assert not found.reachable
    assert found.problem == f"127.0.0.1:{port}: connection refused"


def test_sentinel_names_the_master_which_is_pinged(redis_factory) -> None:
    master = redis_factory("--maxmemory", "1mb")
    sentinel = redis_factory(sentinel_conf=f"sentinel monitor mymaster 127.0.0.1 {master.port} 1")
    url = f"redis-sentinel://127.0.0.1:{sentinel.port},127.0.0.1:{free_port()}"
    found = probe_remote(target(url, REDIS_SERVICE_NAME="mymaster"), TIMEOUT)
    assert found.reachable, found.problem
    assert f"-> master 127.0.0.1:{master.port} answers PING" in found.detail
    assert found.maxmemory == 1024 * 1024
    unknown = probe_remote(target(url, REDIS_SERVICE_NAME="othermaster"), TIMEOUT)
    assert not unknown.reachable and "knows no master named 'othermaster'" in (unknown.problem or "")
    unnamed = probe_remote(target(url), TIMEOUT)
    assert not unnamed.reachable and "REDIS_SERVICE_NAME is not set" in (unnamed.problem or "")


def test_cluster_node_must_report_cluster_state_ok(redis_factory, tmp_path: Path) -> None:
    node = redis_factory("--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf"))
    url = f"redis-cluster://127.0.0.1:{node.port}"
    before = probe_remote(target(url), TIMEOUT)
    assert not before.reachable and "cluster_state:fail" in (before.problem or "")
    node.cli("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
    wait_for(lambda: "cluster_state:ok" in node.cli("CLUSTER", "INFO"), 10, what="cluster_state:ok")
    after = probe_remote(target(url), TIMEOUT)
    assert after.reachable and after.detail.endswith("cluster_state:ok")


def test_cluster_url_on_a_plain_redis_says_so(redis_factory) -> None:
    server = redis_factory()
    found = probe_remote(target(f"redis-cluster://127.0.0.1:{server.port}"), TIMEOUT)
    assert not found.reachable and "is not a cluster node" in (found.problem or "")


def test_lm_server_needs_only_a_tcp_connection() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        found = probe_remote(target(f"lm://127.0.0.1:{port}"), TIMEOUT)
        assert found.reachable and "accepts TCP connections" in found.detail
    closed = probe_remote(target(f"lm://127.0.0.1:{free_port()}"), TIMEOUT)
    assert not closed.reachable and "connection refused" in (closed.problem or "")


def test_mooncake_is_reported_as_not_probed() -> None:
    found = probe_remote(RemoteTarget("mooncakestore://", "mooncakestore", ()), TIMEOUT)
    assert found.reachable and not found.probed


# ------------------------------------------------------------------------------------------- ports


def test_a_port_bound_here_is_taken_and_owned_by_this_process() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        found = host.port_facts("127.0.0.1", port)
        assert not found.free
        assert found.owner_pid == os.getpid()
        assert found.owner_name == psutil.Process().name()
        # A wildcard bind collides with the loopback listener too.
        assert not host.port_facts("0.0.0.0", port).free
    assert host.port_facts("127.0.0.1", port).free


def test_a_foreign_bind_address_is_a_problem_not_a_crash() -> None:
    found = host.port_facts("203.0.113.7", free_port())  # TEST-NET-3: never an address of this host
    assert not found.free and "not an address of this machine" in (found.problem or "")
    bad = host.port_facts("no-such-host.invalid", 8000)
    assert not bad.free and "cannot resolve" in (bad.problem or "")


# ----------------------------------------------------------------------------------------- paths


def test_paths_writable_missing_and_unwritable(tmp_path: Path) -> None:
    ok = host.path_facts(str(tmp_path / "not" / "yet"))
    assert ok.writable and ok.checked == str(tmp_path) and ok.free_bytes and ok.free_bytes > 0
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    (tmp_path / "file").write_text("x")
    under_file = host.path_facts(str(tmp_path / "file" / "cache"))
    assert not under_file.writable and "is not a directory" in (under_file.problem or "")
    proc = host.path_facts("/proc/lmcache-supervise-cache")  # procfs refuses new files, even to root
    assert not proc.writable and proc.checked == "/proc"


# -------------------------------------------------------------------------------------- software


def test_software_probe_in_the_project_venv_finds_dynamo() -> None:
    found = host.software_facts(InterpreterRequest(VENV_PYTHON, ("dynamo", "vllm")), 120)
    assert found.problem is None and found.python and found.python.startswith("3.")
    dynamo = found.module("dynamo")
    assert dynamo is not None and dynamo.error is None and dynamo.version == "1.6.1"
    vllm = found.module("vllm")
    assert vllm is not None and vllm.error == "missing"


def test_software_probe_in_a_bare_venv_misses_dynamo(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    found = host.software_facts(
        InterpreterRequest(str(tmp_path / "bare" / "bin" / "python"), ("dynamo",)), 60
    )
    assert found.problem is None and found.module("dynamo").error == "missing"


def test_software_probe_of_missing_and_non_python_interpreters(tmp_path: Path) -> None:
    missing = host.software_facts(InterpreterRequest(str(tmp_path / "python9"), ("dynamo",)), 10)
    assert missing.problem == f"worker interpreter {tmp_path / 'python9'} not found"
    not_python = host.software_facts(InterpreterRequest(shutil.which("true") or "/bin/true", ("dynamo",)), 10)
    assert not_python.problem and "is not a working Python" in not_python.problem


def _package(root: Path, name: str, version: str, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    info = root / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(f"{name}\n")


def test_lmcache_native_module_abi_mismatch_is_reported_with_versions(tmp_path: Path) -> None:
    # Real packages on a real import path: LMCache whose compiled ops fail like a torch ABI mismatch.
    _package(tmp_path, "torch", "2.14.0", {"__init__.py": "__version__ = '2.14.0'\n"})
    _package(
        tmp_path,
        "lmcache",
        "0.5.6",
        {
            "__init__.py": "",
            "cuda_ops.py": "import torch\n"
            "raise ImportError('cuda_ops.so: undefined symbol: _ZN3c104cuda9SetDeviceEa')\n",
        },
    )
    req = InterpreterRequest(
        VENV_PYTHON, ("dynamo", "lmcache"), native=True, env=(("PYTHONPATH", str(tmp_path)),)
    )
    found = host.software_facts(req, 60)
    assert found.problem is None and found.module("lmcache").version == "0.5.6"
    native = found.native
    assert native is not None and native.module == "lmcache.cuda_ops"
    assert "undefined symbol" in (native.error or "")
    assert (native.lmcache_version, native.torch_version) == ("0.5.6", "2.14.0")


def test_lmcache_older_c_ops_name_is_found_when_it_loads(tmp_path: Path) -> None:
    _package(tmp_path, "lmcache", "0.3.0", {"__init__.py": "", "c_ops.py": ""})
    req = InterpreterRequest(VENV_PYTHON, ("lmcache",), native=True, env=(("PYTHONPATH", str(tmp_path)),))
    native = host.software_facts(req, 60).native
    assert native is not None and (native.module, native.error) == ("lmcache.c_ops", None)


# ----------------------------------------------------------------------------------------- model


def test_local_model_needs_config_and_tokenizer(tmp_path: Path) -> None:
    assert host.model_facts(ModelRequest(str(tmp_path), True)).missing == (
        "config.json",
        "a tokenizer (tokenizer.json, tokenizer.model, vocab.json, tekken.json)",
    )
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert host.model_facts(ModelRequest(str(tmp_path), True)).found
    gone = host.model_facts(ModelRequest(str(tmp_path / "nope"), True))
    assert not gone.found and gone.missing == ("the directory itself",)


def test_hf_id_is_looked_up_in_the_cache_the_env_names(tmp_path: Path) -> None:
    env = (("HF_HUB_CACHE", str(tmp_path)), ("HF_HUB_OFFLINE", "1"))
    absent = host.model_facts(ModelRequest("Qwen/Qwen3-0.6B", False, env))
    assert not absent.found and absent.offline and absent.searched == (str(tmp_path),)
    snap = tmp_path / "models--Qwen--Qwen3-0.6B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    present = host.model_facts(ModelRequest("Qwen/Qwen3-0.6B", False, env))
    assert present.found and present.location == str(snap)
    assert host.hf_cache_dirs({"HF_HOME": "/h"}) == (Path("/h/hub"),)
    assert host.hf_cache_dirs({"XDG_CACHE_HOME": "/x", "HOME": "/home/u"}) == (Path("/x/huggingface/hub"),)
    assert host.hf_cache_dirs({"HOME": "/home/u"}) == (Path("/home/u/.cache/huggingface/hub"),)


# ------------------------------------------------------------------------------------------ etcd


class _Health(http.server.BaseHTTPRequestHandler):
    body = {"health": "true", "reason": ""}

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        data = json.dumps(self.body if self.path == "/health" else {}).encode()
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    ("body", "healthy"), [({"health": "true"}, True), ({"health": "false", "reason": "no leader"}, False)]
)
def test_etcd_health_endpoint(body: dict, healthy: bool) -> None:
    handler = type("H", (_Health,), {"body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        found = host.etcd_facts(f"127.0.0.1:{server.server_address[1]}", TIMEOUT)
        assert found.healthy is healthy
        if not healthy:
            assert "no leader" in (found.problem or "")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    down = host.etcd_facts(f"http://127.0.0.1:{free_port()}", TIMEOUT)
    assert not down.healthy and "did not answer" in (down.problem or "")


# ---------------------------------------------------------------------------------------- gather


class _NvmlMustNotBeCalled:
    NVMLError = Exception

    def __getattr__(self, name: str):
        raise AssertionError(f"NVML was called ({name}) for a plan that needs no GPU")


def test_gather_probes_only_what_is_requested(tmp_path: Path) -> None:
    facts = host.gather(FactsRequest(paths=(str(tmp_path),)), nvml=_NvmlMustNotBeCalled(), arch="aarch64")
    assert facts.arch == "aarch64" and facts.gpus is None
    assert facts.remotes == () and facts.software == () and facts.model is None and facts.etcd == ()
    assert facts.path(str(tmp_path)) is not None and facts.path(str(tmp_path)).writable
    assert 0 < facts.memory.available_bytes <= facts.memory.total_bytes


def test_executables_resolve_as_the_spawn_would(tmp_path: Path) -> None:
    from supervisor.host.software import ExecutableRequest, executable_facts

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "etcd"
    tool.write_text("#!/bin/sh\n")
    assert executable_facts(ExecutableRequest(str(tool), "")).problem == f"{tool} is not executable"
    assert executable_facts(ExecutableRequest("etcd", str(bin_dir))).path is None  # not executable either
    tool.chmod(0o755)
    assert executable_facts(ExecutableRequest(str(tool), "")).path == str(tool)
    assert executable_facts(ExecutableRequest("etcd", f"/nonexistent:{bin_dir}")).path == str(tool)
    missing = executable_facts(ExecutableRequest("etcd", "/nonexistent"))
    assert (missing.path, missing.problem) == (None, "etcd is not on the PATH the process gets")
    gone = executable_facts(ExecutableRequest(str(tmp_path / "nope"), ""))
    assert gone.problem == f"{tmp_path / 'nope'} does not exist"


def test_lmcache_config_files_are_read_as_lmcache_reads_them(tmp_path: Path) -> None:
    good = tmp_path / "lmcache.yaml"
    good.write_text(
        "chunk_size: 512\nlocal_cpu: yes\nremote_url: redis://r:6379\nextra_config: {a: 1}\nx: null\n"
    )
    found = host.lmcache_file_facts("lmcache.yaml", str(tmp_path))  # relative to the process's cwd
    assert found.problem is None
    assert found.values == (("chunk_size", "512"), ("local_cpu", "true"), ("remote_url", "redis://r:6379"))
    (tmp_path / "c.json").write_text('{"max_local_cpu_size": 2.5}')
    assert host.lmcache_file_facts(str(tmp_path / "c.json"), "/").values == (("max_local_cpu_size", "2.5"),)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert (
        host.lmcache_file_facts(str(tmp_path / "list.yaml"), None).problem
        == "holds a list, not a mapping of LMCache keys"
    )
    (tmp_path / "bad.yaml").write_text("chunk_size: [1, 2\n")
    assert host.lmcache_file_facts(str(tmp_path / "bad.yaml"), None).problem.startswith("is not valid YAML: ")
    missing = host.lmcache_file_facts(str(tmp_path / "none.yaml"), None)
    assert missing.problem == "cannot be read: No such file or directory"
    assert host.lmcache_file_facts(str(tmp_path / "empty.yaml"), None).problem  # absent too
    (tmp_path / "empty.yaml").write_text("")
    assert host.lmcache_file_facts(str(tmp_path / "empty.yaml"), None).values == ()


def test_one_socket_table_scan_serves_every_port_asked_about_within_its_age() -> None:
    """ports.snapshot: the probes' stranger check reads the host's table at most once per period
    for all ports together, and sees a new listener once the period is over."""
    first = ports.snapshot(max_age_s=0)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        cached = ports.snapshot(max_age_s=60)
        assert cached is first and ports.holder(port, table=cached) is None  # the earlier scan
        fresh = ports.snapshot(max_age_s=0)
        held = ports.holder(port, table=fresh)
        assert held is not None and held.pid == os.getpid()
        assert ports.snapshot(max_age_s=60) is fresh
