"""The supervisor's Prometheus endpoint (scraped and parsed), the file_sd targets file, and the summary parser."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
from conftest import free_port_base
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.control import metrics, scrape
from supervisor.control.progress import Timeline
from supervisor.engine.runner import Runner
from supervisor.engine.states import DeploymentState
from supervisor.plan.spec import HttpCheck, Plan, Probe, Probes, Role

pytestmark = pytest.mark.anyio


def probes(port: int) -> Probes:
    check = HttpCheck(url=f"http://127.0.0.1:{port}/health")
    return Probes(
        startup=Probe(check=check, period_s=0.05, timeout_s=1.0, failure_threshold=200),
        readiness=Probe(check=check, period_s=0.1, timeout_s=1.0),
    )


def worker_plan(make_spec, make_plan, base: int) -> Plan:
    """A frontend-like process and two workers (fixture children serving /health on their system port)."""
    frontend = make_spec(
        "frontend", "--port", str(base), role=Role.FRONTEND, ports={"http": base}, probes=probes(base)
    )
    decode = make_spec(
        "decode",
        "--port",
        str(base + 1),
        role=Role.DECODE,
        ports={"system": base + 1},
        gpus=(0, 1),
        probes=probes(base + 1),
    )
    prefill = make_spec(
        "prefill",
        "--port",
        str(base + 2),
        role=Role.PREFILL,
        ports={"system": base + 2},
        gpus=(2,),
        probes=probes(base + 2),
    )
    plan = make_plan(frontend, decode, prefill)
    return dataclasses.replace(plan, deployment=dataclasses.replace(plan.deployment, metrics_port=base + 3))


@asynccontextmanager
async def exported(plan: Plan) -> AsyncIterator[tuple[Runner, metrics.SupervisorMetrics]]:
    runner = Runner(plan)
    timeline = Timeline()
    exporter = metrics.SupervisorMetrics(plan, timeline)
    runner.subscribe(timeline)
    runner.subscribe(exporter)
    async with anyio.create_task_group() as tg:

        async def supervise() -> None:
            await runner.serve()
            tg.cancel_scope.cancel()

        tg.start_soon(exporter.serve, runner)
        tg.start_soon(supervise)
        try:
            await runner.wait_until(lambda s: s.state is DeploymentState.READY, timeout_s=20)
            yield runner, exporter
        finally:
            runner.request_shutdown()


def families(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


async def get(url: str) -> str:
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(url, timeout=5)
    assert response.status_code == 200
    return response.text


async def test_the_endpoint_serves_process_and_deployment_series(make_spec, make_plan) -> None:
    base = free_port_base(4)
    plan = worker_plan(make_spec, make_plan, base)
    url = f"http://127.0.0.1:{base + 3}/metrics"
    async with exported(plan) as (runner, exporter):
        assert exporter.port == base + 3
        found = families(await get(url))
        prefix = "lmcache_supervise_"
        for name in (
            "process_up",
            "process_state",
            "process_restarts",
            "process_start_time_seconds",
            "probe_latency_seconds",
            "deployment_state",
            "deployment_time_to_ready_seconds",
        ):
            assert prefix + name in found, name
        up = {s.labels["process"]: s.value for s in found[prefix + "process_up"]}
        assert up == {"frontend": 1.0, "decode": 1.0, "prefill": 1.0}
        assert {s.labels["role"] for s in found[prefix + "process_up"]} == {"frontend", "decode", "prefill"}
        assert all(s.labels["deployment"] == "test" for s in found[prefix + "process_up"])
        current = {
            (s.labels["process"], s.labels["state"]) for s in found[prefix + "process_state"] if s.value == 1
        }
        assert current == {("frontend", "healthy"), ("decode", "healthy"), ("prefill", "healthy")}
        counts = [s for s in found[prefix + "probe_latency_seconds"] if s.name.endswith("_count")]
        assert {s.labels["process"] for s in counts if s.value >= 1} == {"frontend", "decode", "prefill"}
        ttr = found[prefix + "deployment_time_to_ready_seconds"][0]
        assert ttr.labels == {"deployment": "test"} and 0 < ttr.value < 20
        ready = [s for s in found[prefix + "deployment_state"] if s.value == 1]
        assert [s.labels["state"] for s in ready] == ["ready"]

        old = runner.status().process("decode").pid
        await runner.restart("decode")
        await runner.wait_until(
            lambda s: s.process("decode").pid not in (None, old) and s.state is DeploymentState.READY,
            timeout_s=20,
        )
        found = families(await get(url))
        restarts = {
            s.labels["process"]: s.value
            for s in found[prefix + "process_restarts"]
            if s.name.endswith("_total")
        }
        assert restarts == {"frontend": 0.0, "decode": 1.0, "prefill": 0.0}
        exits = {s.labels["process"]: s.value for s in found[prefix + "process_last_exit_code"]}
        assert exits == {"decode": 128.0 + 15}  # SIGTERM killed the fixture child: 128 + N
    with pytest.raises(httpx.ConnectError):
        await get(url)  # the endpoint goes with the supervisor


async def test_the_targets_file_lists_each_worker_with_its_labels(make_spec, make_plan) -> None:
    base = free_port_base(4)
    plan = worker_plan(make_spec, make_plan, base)
    path = Path(plan.deployment.targets_file)
    async with exported(plan):
        entries = json.loads(path.read_text())
        assert entries == [
            {
                "targets": [f"127.0.0.1:{base}"],
                "labels": {"deployment": "test", "process": "frontend", "role": "frontend", "gpu": ""},
            },
            {
                "targets": [f"127.0.0.1:{base + 1}"],
                "labels": {"deployment": "test", "process": "decode", "role": "decode", "gpu": "0,1"},
            },
            {
                "targets": [f"127.0.0.1:{base + 2}"],
                "labels": {"deployment": "test", "process": "prefill", "role": "prefill", "gpu": "2"},
            },
        ]
        assert oct(os.stat(path).st_mode & 0o777) == "0o644"
        assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []  # tmp + rename
        assert [t.url for t in scrape.read_targets(path)] == [
            f"http://127.0.0.1:{base + i}/metrics" for i in range(3)
        ]
    assert not path.exists()  # Prometheus must not scrape ports nobody serves


async def test_no_port_means_no_endpoint_but_still_a_targets_file(make_spec, make_plan) -> None:
    plan = make_plan(make_spec("decode", role=Role.DECODE, ports={"system": 1}))
    async with exported(plan) as (_, exporter):
        assert exporter.port is None
        assert json.loads(Path(plan.deployment.targets_file).read_text())[0]["targets"] == ["127.0.0.1:1"]


def exposition() -> str:
    """What a vLLM + LMCache worker exports (names from vLLM and LMCache 0.5's PrometheusLogger)."""
    r = CollectorRegistry()
    labels = {"model_name": "m", "worker_id": "0"}
    Counter("lmcache:num_hit_tokens", "", list(labels), registry=r).labels(**labels).inc(750)
    Counter("lmcache:num_requested_tokens", "", list(labels), registry=r).labels(**labels).inc(1000)
    Gauge("lmcache:local_cache_usage", "", list(labels), registry=r).labels(**labels).set(2 * 2**30)
    Counter("vllm:prefix_cache_hits", "", ["engine"], registry=r).labels(engine="0").inc(64)
    Counter("vllm:prefix_cache_queries", "", ["engine"], registry=r).labels(engine="0").inc(128)
    Gauge("vllm:kv_cache_usage_perc", "", ["engine"], registry=r).labels(engine="0").set(0.25)
    requests = Counter("dynamo_component_requests", "", ["dynamo_endpoint"], registry=r)
    requests.labels(dynamo_endpoint="generate").inc(3)
    requests.labels(dynamo_endpoint="clear_kv_blocks").inc(9)
    return generate_latest(r).decode()


def test_the_summary_reads_lmcache_and_vllm_series() -> None:
    target = scrape.Target(process="decode", role="decode", gpu="0", url="http://x/metrics")
    summary = scrape.summarize(target, scrape.parse(exposition()))
    assert summary.requests == 3  # only the generate endpoint counts as requests
    assert (
        summary.lmcache_hits == 750 and summary.lmcache_requested == 1000 and summary.lmcache_hit_rate == 0.75
    )
    assert summary.lmcache_local_usage_bytes == 2 * 2**30
    assert summary.prefix_hit_rate == 0.5 and summary.kv_usage == 0.25
    assert summary.counters == {
        scrape.LMCACHE_HITS: 750,
        scrape.LMCACHE_REQUESTED: 1000,
        scrape.PREFIX_HITS: 64,
        scrape.PREFIX_QUERIES: 128,
    }
    bare = scrape.summarize(target, scrape.parse("# TYPE other gauge\nother 1\n"))
    assert (
        bare.lmcache_hits is None and bare.lmcache_hit_rate is None and bare.kv_usage is None
    )  # absent != 0
    assert scrape.hit_counters([summary, summary])[scrape.LMCACHE_HITS] == 1500
    broken = scrape.summarize(target, {}, "GET http://x/metrics: ConnectError")
    assert broken.to_json()["error"] == "GET http://x/metrics: ConnectError"
