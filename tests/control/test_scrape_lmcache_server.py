"""The multiprocess cache server's own /metrics, as `lmcache server` 0.5.6 exposes it (text captured from
a real server on this machine after one lookup), summarised for `metrics`, `status` and the targets file."""

from __future__ import annotations

from pathlib import Path

from supervisor.control import scrape
from supervisor.control.metrics import targets
from supervisor.plan import render as planmod
from supervisor.profile import load as profiles

MP_METRICS = """\
# HELP lmcache_mp_lookup_requested_tokens_total Total tokens submitted for lookup
# TYPE lmcache_mp_lookup_requested_tokens_total counter
lmcache_mp_lookup_requested_tokens_total{service_instance_id="f46"} 1024.0
# HELP lmcache_mp_lookup_hit_tokens_total Total tokens found in L1+L2 during lookup
# TYPE lmcache_mp_lookup_hit_tokens_total counter
lmcache_mp_lookup_hit_tokens_total{service_instance_id="f46"} 256.0
# HELP lmcache_mp_l1_memory_usage_bytes Bytes currently held in L1 cache
# TYPE lmcache_mp_l1_memory_usage_bytes gauge
lmcache_mp_l1_memory_usage_bytes{backend="dram",l1_tag="_default"} 1.34217728e+08
# HELP lmcache_mp_l1_usage_ratio L1 used/total ratio (0.0-1.0)
# TYPE lmcache_mp_l1_usage_ratio gauge
lmcache_mp_l1_usage_ratio{backend="dram",l1_tag="_default"} 0.25
"""


def test_server_series_become_hits_requested_and_l1() -> None:
    target = scrape.Target(process="lmcache-server", role="lmcache-server", gpu="", url="http://x/metrics")
    summary = scrape.summarize(target, scrape.parse(MP_METRICS))
    assert summary.lmcache_hits == 256.0 and summary.lmcache_requested == 1024.0
    assert summary.lmcache_hit_rate == 0.25
    assert summary.lmcache_local_usage_bytes == 128 * 2**20 and summary.l1_usage_ratio == 0.25
    assert summary.l1_capacity_bytes == 512 * 2**20
    doc = summary.to_json()
    assert doc["l1_capacity_bytes"] == 512 * 2**20 and doc["lmcache_hit_tokens"] == 256.0
    assert scrape.hit_counters([summary]) == {scrape.MP_HITS: 256.0, scrape.MP_REQUESTED: 1024.0}


def test_before_any_lookup_the_counters_are_absent_not_zero() -> None:
    text = "\n".join(line for line in MP_METRICS.splitlines() if "lookup" not in line) + "\n"
    target = scrape.Target(process="lmcache-server", role="lmcache-server", gpu="", url="http://x/metrics")
    summary = scrape.summarize(target, scrape.parse(text))
    assert summary.lmcache_hits is None and summary.lmcache_requested is None
    assert summary.l1_usage_ratio == 0.25


def test_the_server_is_a_file_sd_target() -> None:
    plan = planmod.render(profiles.load("demo-lmcache"), state_root=Path("/srv"))
    entries = {e["labels"]["process"]: e for e in targets(plan)}
    assert entries["lmcache-server"]["targets"] == ["127.0.0.1:18756"]
    assert entries["lmcache-server"]["labels"]["role"] == "lmcache-server"
