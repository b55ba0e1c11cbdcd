"""Every vLLM worker the supervisor renders, read by the released engines: Dynamo's parser, vLLM's
connector registry and engine-config validation, LMCache's config loader (tests/engines/tier.py).

The built-in vLLM profiles and a hypothesis-generated set of valid ones must be read exactly as
planned: argv accepted, the planned disaggregation mode, each connector resolved and importable,
every LMCACHE_* value read as meant. The misreads the schema refuses are shown to be real misreads of
the released LMCache, so the schema's rules stay tied to the software they guard against."""

from __future__ import annotations

import dataclasses
import json

import pytest
from enginekit import TIER_PLANS, VLLM_PROFILES, ask, disagreements, judge, render
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.errors import SupervisorError
from supervisor.preflight.findings import Status

# --------------------------------------------------------------------------------- built-in profiles


@pytest.fixture(scope="module")
def builtin(engines_python: str):
    plans = {key: render(name, engines_python, sets) for key, (name, sets) in TIER_PLANS.items()}
    return plans, ask(plans, engines_python)


@pytest.mark.parametrize("name", TIER_PLANS)
def test_builtin_profile_is_read_as_planned(builtin, name: str) -> None:
    plans, answers = builtin
    plan, facts = plans[name], answers[name]
    assert disagreements(plan, facts) == []
    assert [f.status for f in judge(plan, facts)] == [Status.OK]
    versions = dict(facts.versions)
    assert versions["ai-dynamo"] == "1.6.1" and versions["vllm"] and versions["lmcache"]


def test_connectors_resolve_to_the_classes_dynamo_expects(builtin) -> None:
    _, answers = builtin
    prefill = answers["disagg"].process("prefill")
    assert prefill is not None and prefill.mode == "prefill"
    assert [(c.connector, c.depth) for c in prefill.connectors] == [
        ("PdConnector", 0),
        ("LMCacheConnectorV1", 1),
        ("NixlConnector", 1),
    ]
    assert prefill.connectors[0].resolved == "kvbm.vllm_integration.connector.pd_connector.PdConnector"
    decode = answers["disagg"].process("decode")
    assert (
        decode is not None and decode.mode == "decode" and decode.connectors[0].connector == "NixlConnector"
    )
    worker = answers["agg"].process("worker")
    assert worker is not None and worker.mode == "agg"
    assert [r.var for r in worker.lmcache_reads] == [
        "LMCACHE_CHUNK_SIZE",
        "LMCACHE_LOCAL_CPU",
        "LMCACHE_LOG_LEVEL",
        "LMCACHE_MAX_LOCAL_CPU_SIZE",
        "LMCACHE_TRACK_USAGE",
    ]
    assert answers["agg-nolmcache"].process("worker").connectors == ()  # type: ignore[union-attr]


# --------------------------------------------------------------------------------- generated profiles

BOOL_TEXTS = st.sampled_from(["true", "false", "1", "0", "TRUE", "False"])
ENGINE_FLAGS = st.sampled_from(
    [
        ("--max-num-seqs", "64"),
        ("--block-size", "16"),
        ("--max-model-len", "2048"),
        ("--enforce-eager",),
        ("--max-num-batched-tokens", "4096"),
        ("--no-enable-prefix-caching",),
    ]
)
REMOTES = st.sampled_from(
    [
        "redis://127.0.0.1:6379",
        "redis://:secret@127.0.0.1:6380/0",
        "rediss://cache.example:6379",
        "redis-sentinel://127.0.0.1:26379,127.0.0.2:26379",
        "lm://127.0.0.1:65432",
    ]
)
EXTRA = st.dictionaries(
    st.sampled_from(["save_unfull_chunk", "enable_async_loading", "use_layerwise", "blocking_timeout_secs"]),
    st.booleans(),
    max_size=2,
).map(lambda d: {k: (17 if k == "blocking_timeout_secs" else v) for k, v in d.items()})


def toml(value: object) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


@st.composite
def valid_overrides(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A built-in vLLM profile and --set overrides a user could write, all of which validate."""
    base = draw(st.sampled_from(VLLM_PROFILES))
    sets = []
    if "nolmcache" not in base:
        lm = {
            "chunk_size": draw(st.sampled_from([16, 64, 256, 1024])),
            "local_cpu": draw(st.booleans()),
            "max_local_cpu_size": draw(st.sampled_from([0.5, 1, 5.0, 20.25])),
            "track_usage": draw(st.booleans()),
            "log_level": draw(st.sampled_from(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])),
            "hash_seed": draw(st.integers(0, 2**32 - 1)),
        }
        sets += [f"lmcache.{k}={toml(v)}" for k, v in lm.items()]
        if draw(st.booleans()):
            sets += [
                'lmcache.local_disk="/var/cache/lm cache"',
                f"lmcache.max_local_disk_size={draw(st.sampled_from([1, 50.5]))}",
            ]
        if draw(st.booleans()):
            url = draw(REMOTES)
            serde = toml(draw(st.sampled_from(["naive", "cachegen"])))
            master = ', service_name="mymaster"' if url.startswith("redis-sentinel") else ""
            sets.append(f"lmcache.remote={{url={toml(url)}, serde={serde}{master}}}")
        extra = draw(EXTRA)
        if extra:
            sets.append("lmcache.extra={" + ", ".join(f"{k}={toml(v)}" for k, v in extra.items()) + "}")
    if draw(st.booleans()):
        sets.append('frontend.router_mode="kv"')
    workers = {"agg": ["worker"]}.get(base.split("-")[0], ["decode", "prefill"])
    for worker in workers:
        flags = draw(st.lists(ENGINE_FLAGS, max_size=3, unique=True))
        if flags:
            sets.append(f"workers.{worker}.args={json.dumps([a for f in flags for a in f])}")
        if "nolmcache" not in base and draw(st.booleans()):
            sets.append(f'workers.{worker}.env={{LMCACHE_SAVE_UNFULL_CHUNK="{draw(BOOL_TEXTS)}"}}')
        sets.append(f"workers.{worker}.gpu_memory_utilization={draw(st.sampled_from([0.5, 0.9, 0.95]))}")
    return base, sets


@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
@given(batch=st.lists(valid_overrides(), min_size=6, max_size=6))
def test_generated_valid_profiles_are_read_as_planned(engines_python: str, batch) -> None:
    plans = {}
    for i, (base, sets) in enumerate(batch):
        try:
            plans[f"p{i}"] = render(base, engines_python, sets)
        except SupervisorError as exc:  # the strategy only writes valid profiles
            pytest.fail(f"{base} {sets}: {exc}")
    answers = ask(plans, engines_python)
    for key, plan in plans.items():
        base, sets = batch[int(key[1:])]
        assert disagreements(plan, answers[key]) == [], (base, sets)
        assert all(f.status is not Status.FAIL for f in judge(plan, answers[key])), (base, sets)


# ------------------------------------------------------------------------- the misreads the schema refuses


MISREADS = {
    # variable: (a text the released LMCache misreads, the override the schema refuses it in)
    "LMCACHE_LOCAL_CPU": ("yes", 'workers.worker.env={LMCACHE_LOCAL_CPU="yes"}'),
    "LMCACHE_MAX_LOCAL_CPU_SIZE": ("10GB", 'workers.worker.env={LMCACHE_MAX_LOCAL_CPU_SIZE="10GB"}'),
    "LMCACHE_TRACK_USAGE": ("0", 'workers.worker.env={LMCACHE_TRACK_USAGE="0"}'),
    "LMCACHE_SAVE_UNFULL_CHUNK": ("on", 'lmcache.extra={save_unfull_chunk="on"}'),
}


def test_what_the_schema_refuses_is_what_the_released_lmcache_misreads(engines_python: str) -> None:
    plan = render("agg", engines_python)
    plans = {}
    for var, (text, override) in MISREADS.items():
        with pytest.raises(SupervisorError):  # the schema refuses it...
            render("agg", engines_python, [override])
        worker = next(p for p in plan.processes if p.name == "worker")  # ...written past the schema:
        bad = dataclasses.replace(worker, env={**worker.env, var: text})
        plans[var] = dataclasses.replace(
            plan, processes=tuple(bad if p is worker else p for p in plan.processes)
        )
    answers = ask(plans, engines_python)
    for var, (text, _) in MISREADS.items():
        found = [f for f in judge(plans[var], answers[var]) if f.status is Status.FAIL]
        assert len(found) == 1 and f"{var}={text!r} is not read as meant" in found[0].message, (var, found)


def test_kvbm_refuses_the_cache_servers_connector_inside_pdconnector(engines_python: str) -> None:
    """kvbm 1.6.1's PdConnector takes only DynamoConnector, LMCacheConnectorV1 or FlexKVConnectorV1
    first, so the plan refuses a prefill worker beside a multiprocess cache server (whose connector
    is LMCacheMPConnector). Written past that rule, the released kvbm refuses it indeed."""
    with pytest.raises(SupervisorError, match="LMCacheMPConnector inside PdConnector"):
        render("disagg", engines_python, ["lmcache.server={l1_size_gb=0.5}"])
    plan = render("disagg", engines_python)
    prefill = next(p for p in plan.processes if p.name == "prefill")
    argv = list(prefill.argv)
    at = argv.index("--kv-transfer-config") + 1
    config = json.loads(argv[at])
    mp = {
        "kv_connector": "LMCacheMPConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": 8555},
    }
    config["kv_connector_extra_config"]["connectors"][0] = mp
    argv[at] = json.dumps(config)
    bad = dataclasses.replace(prefill, argv=tuple(argv))
    plan = dataclasses.replace(plan, processes=tuple(bad if p is prefill else p for p in plan.processes))
    facts = ask({"disagg-mp": plan}, engines_python)["disagg-mp"]
    verdict = facts.process("prefill")
    assert verdict is not None
    assert [c.connector for c in verdict.connectors] == ["PdConnector", "LMCacheMPConnector", "NixlConnector"]
    assert verdict.connectors[0].verdict.error == (
        "PdConnector's first connector must be LMCache, KVBM or FlexKV, not LMCacheMPConnector"
    )
    (failure,) = [f for f in judge(plan, facts) if f.status is Status.FAIL]
    assert failure.message.startswith("prefill: PdConnector refused: PdConnector's first connector must be")
