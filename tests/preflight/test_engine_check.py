"""The ``engine`` check judges the engines' own answer (pure): hand-made answers, one concern each.

The answers' shapes are the ones ``supervisor/host/engine_probe.py`` returns from the released engines
(tests/engines/ runs it for real against them)."""

from __future__ import annotations

import dataclasses

import pytest
from test_preflight import PY, healthy, only, render

from supervisor.host.engines import ConnectorVerdict, EngineFacts, LMCacheRead, ProcessVerdict, Verdict
from supervisor.preflight.checks import check, enforce
from supervisor.preflight.engines import misread
from supervisor.preflight.findings import Status

VERSIONS = (("ai-dynamo", "1.6.1"), ("vllm", "0.31.0"), ("nixl", None))


def engines(*processes: ProcessVerdict, device: str = "cuda") -> tuple[EngineFacts, ...]:
    return (EngineFacts(PY, versions=VERSIONS, device=device, processes=processes),)


def read(var: str, text: str, value: object, key: str = "") -> LMCacheRead:
    return LMCacheRead(var, key or var.removeprefix("LMCACHE_").lower(), text, value, Verdict(True))


def engine_findings(name: str, *processes: ProcessVerdict, device: str = "cuda"):
    plan = render(name)
    return only(check(plan, healthy(plan, engines=engines(*processes, device=device))), "engine")


def test_an_unknown_flag_fails_naming_process_flag_and_versions() -> None:
    refused = Verdict(False, "unrecognized arguments: --no-such-flag 3", flag="--no-such-flag")
    (found,) = engine_findings("agg", ProcessVerdict("worker", args=refused))
    assert found.status is Status.FAIL
    assert found.message.startswith("worker: --no-such-flag refused by Dynamo's vLLM argument parsing")
    assert "ai-dynamo 1.6.1, vllm 0.31.0, nixl not installed" in found.message
    with pytest.raises(Exception) as err:
        enforce([found])
    assert getattr(err.value, "exit_code", None) == 3


def test_a_connector_whose_package_is_missing_fails_naming_the_package() -> None:
    no_nixl = Verdict(False, "ModuleNotFoundError: No module named 'nixl'", package="nixl")
    decode = ProcessVerdict(
        "decode", args=Verdict(True), connectors=(ConnectorVerdict("NixlConnector", 0, no_nixl),)
    )
    prefill = ProcessVerdict("prefill", args=Verdict(True))
    found = engine_findings("disagg", decode, prefill)
    assert [f.status for f in found] == [Status.FAIL]
    assert found[0].message.startswith(f"decode: NixlConnector cannot load: nixl is not importable in {PY}")
    assert "nixl[cu13]==1.4.1" in found[0].hint


def test_engine_config_refusal_is_a_warning_on_the_cpu_platform_and_a_failure_on_gpus() -> None:
    refused = ProcessVerdict("worker", args=Verdict(True), engine_config=Verdict(False, "ValueError: bad tp"))
    (on_cpu, summary) = engine_findings("agg", refused, device="cpu")
    assert on_cpu.status is Status.WARN and "CPU platform" in on_cpu.message and summary.status is Status.OK
    (on_gpu,) = engine_findings("agg", refused, device="cuda")
    assert on_gpu.status is Status.FAIL and "bad tp" in on_gpu.message


def test_lmcache_misreads_fail_and_ignored_variables_warn() -> None:
    worker = ProcessVerdict(
        "worker",
        args=Verdict(True),
        lmcache=Verdict(True),
        lmcache_reads=(read("LMCACHE_TRACK_USAGE", "0", True), read("LMCACHE_CHUNK_SIZE", "256", 256)),
        lmcache_ignored=("LMCACHE_NOT_A_KEY",),
    )
    found = engine_findings("agg", worker)
    assert [f.status for f in found] == [Status.FAIL, Status.WARN]
    assert (
        "LMCACHE_TRACK_USAGE='0' is not read as meant: LMCache reads it as usage tracking on"
        in found[0].message
    )
    assert "LMCACHE_NOT_A_KEY is not a setting LMCache reads" in found[1].message


def test_all_accepted_is_one_ok_line_that_says_what_was_asked() -> None:
    worker = ProcessVerdict(
        "worker",
        args=Verdict(True),
        connectors=(ConnectorVerdict("LMCacheConnectorV1", 0, Verdict(True)),),
        lmcache_reads=(read("LMCACHE_CHUNK_SIZE", "256", 256),),
    )
    (found,) = engine_findings("agg", worker)
    assert found.status is Status.OK
    assert "worker (LMCacheConnectorV1, 1 LMCache settings read as meant)" in found.message


def test_a_probe_that_could_not_run_fails_and_an_unasked_interpreter_warns() -> None:
    plan = render("agg")
    broken = (EngineFacts(PY, problem=f"the engine probe in {PY} took longer than 180 s"),)
    (found,) = only(check(plan, healthy(plan, engines=broken)), "engine")
    assert found.status is Status.FAIL and "took longer than 180 s" in found.message
    (unasked,) = only(check(plan, healthy(plan, engines=())), "engine")
    assert unasked.status is Status.WARN and "was not probed" in unasked.message


def test_mocker_plans_have_nothing_for_the_engines() -> None:
    plan = render("demo")
    (found,) = only(check(plan, healthy(plan)), "engine")
    assert found.status is Status.OK and "no vLLM workers" in found.message


@pytest.mark.parametrize(
    ("var", "text", "value", "meant"),
    [
        ("LMCACHE_LOCAL_CPU", "true", True, True),
        ("LMCACHE_LOCAL_CPU", "yes", False, False),  # LMCache's "yes" is False: not what "yes" means
        ("LMCACHE_MAX_LOCAL_CPU_SIZE", "5.0", 5.0, True),
        ("LMCACHE_MAX_LOCAL_CPU_SIZE", "10GB", None, False),  # unparsable number: None
        ("LMCACHE_LOCAL_DISK", "file:///var/cache/lm/", "/var/cache/lm/", True),
        ("LMCACHE_TRACK_USAGE", "false", False, True),
        ("LMCACHE_TRACK_USAGE", "False", True, False),  # only the exact "false" turns tracking off
        ("LMCACHE_LOG_LEVEL", "info", "INFO", True),
        ("LMCACHE_REMOTE_SERDE", "naive", "naive", True),
        ("LMCACHE_EXTRA_CONFIG", '{"a": 1}', {"a": 1}, True),
        ("LMCACHE_SOME_LIST", "1, 2", [1, 2], True),
    ],
)
def test_misread_compares_what_the_text_means_with_what_lmcache_read(
    var: str, text: str, value: object, meant: bool
) -> None:
    assert (misread(read(var, text, value)) is None) is meant


def test_verdicts_round_trip_from_the_probe_json() -> None:
    data = {
        "name": "prefill",
        "args": {"ok": True},
        "connectors": [
            {"connector": "PdConnector", "depth": 0, "ok": False, "error": "x", "package": "kvbm"}
        ],
        "lmcache": {
            "ok": True,
            "source": "env",
            "values": {"LMCACHE_CHUNK_SIZE": {"key": "chunk_size", "text": "256", "read": 256, "ok": True}},
            "ignored": ["LMCACHE_X"],
        },
    }
    verdict = ProcessVerdict.from_json(data)
    assert verdict.connectors[0].verdict.package == "kvbm"
    assert verdict.lmcache_reads[0] == read("LMCACHE_CHUNK_SIZE", "256", 256)
    assert dataclasses.replace(verdict, lmcache_ignored=()).lmcache_ignored == ()
    assert verdict.lmcache_ignored == ("LMCACHE_X",)


def test_an_extra_config_key_the_connector_never_reads_warns() -> None:
    conn = ConnectorVerdict(
        "LMCacheMPConnector", 0, Verdict(True), "x.LMCacheMPConnector", ("lmcache.mp.prot",)
    )
    worker = ProcessVerdict("worker", args=Verdict(True), connectors=(conn,))
    found = engine_findings("agg", worker)
    assert [f.status for f in found] == [Status.WARN, Status.OK]
    assert (
        "LMCacheMPConnector never reads kv_connector_extra_config key 'lmcache.mp.prot'" in found[0].message
    )
