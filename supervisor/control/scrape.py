"""Reading the supervised processes' own ``/metrics``: the ``metrics`` summary and the smoke test's deltas.

The endpoints come from the deployment's file_sd targets file (:mod:`supervisor.control.metrics`); every
scrape is parsed with prometheus_client's text parser. The series read, by where they come from:

- Dynamo frontend: ``dynamo_frontend_requests_total`` (by ``status``), ``dynamo_frontend_cached_tokens``
  and ``dynamo_frontend_input_sequence_tokens`` (histogram sums: prefix-cache tokens the engines reported).
- Dynamo worker: ``dynamo_component_requests_total`` (endpoint ``generate``).
- vLLM (and the mocker's stand-ins): ``vllm:kv_cache_usage_perc`` (a 0..1 fraction, despite the name),
  ``vllm:prefix_cache_hits_total`` / ``queries_total`` (tokens, GPU prefix cache) and
  ``vllm:external_prefix_cache_hits_total`` / ``queries_total`` (tokens from the KV connector: LMCache).
- LMCache 0.5 (through vLLM's multiprocess registry): ``lmcache:num_hit_tokens_total``,
  ``lmcache:num_requested_tokens_total``, ``lmcache:local_cache_usage`` (bytes).
- LMCache 0.5.6's multiprocess cache server (``lmcache server``, its own ``/metrics``, OTel names):
  ``lmcache_mp_lookup_hit_tokens_total`` / ``lmcache_mp_lookup_requested_tokens_total`` (tokens found /
  asked for in L1+L2), ``lmcache_mp_l1_memory_usage_bytes`` and ``lmcache_mp_l1_usage_ratio`` (0..1).

A series an endpoint does not export is None ("not present"), never 0.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from supervisor.errors import ControlError

FRONTEND_REQUESTS = "dynamo_frontend_requests_total"
FRONTEND_CACHED = "dynamo_frontend_cached_tokens_sum"
FRONTEND_INPUT = "dynamo_frontend_input_sequence_tokens_sum"
WORKER_REQUESTS = "dynamo_component_requests_total"
KV_USAGE = "vllm:kv_cache_usage_perc"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"
EXTERNAL_QUERIES = "vllm:external_prefix_cache_queries_total"
LMCACHE_HITS = "lmcache:num_hit_tokens_total"
LMCACHE_REQUESTED = "lmcache:num_requested_tokens_total"
LMCACHE_LOCAL_USAGE = "lmcache:local_cache_usage"
MP_HITS = "lmcache_mp_lookup_hit_tokens_total"
MP_REQUESTED = "lmcache_mp_lookup_requested_tokens_total"
MP_L1_USAGE = "lmcache_mp_l1_memory_usage_bytes"
MP_L1_RATIO = "lmcache_mp_l1_usage_ratio"
#: The counters whose change proves cache reuse (the smoke test reports their deltas).
HIT_COUNTERS = (
    LMCACHE_HITS,
    LMCACHE_REQUESTED,
    PREFIX_HITS,
    PREFIX_QUERIES,
    EXTERNAL_HITS,
    EXTERNAL_QUERIES,
    MP_HITS,
    MP_REQUESTED,
)

Samples = Mapping[str, tuple[tuple[Mapping[str, str], float], ...]]


@dataclass(frozen=True)
class Target:
    """One ``/metrics`` endpoint from the targets file."""

    process: str
    role: str
    gpu: str
    url: str


def read_targets(path: str | Path) -> tuple[Target, ...]:
    """The endpoints a running deployment published in its file_sd targets file."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ControlError(f"cannot read the Prometheus targets file {path}: {exc}") from None
    return tuple(
        Target(
            process=e["labels"]["process"],
            role=e["labels"]["role"],
            gpu=e["labels"].get("gpu", ""),
            url=f"http://{address}/metrics",
        )
        for e in entries
        for address in e["targets"]
    )


def parse(text: str) -> Samples:
    """Sample name -> ((labels, value), ...), ``_created`` timestamps left out."""
    out: dict[str, list[tuple[Mapping[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return {name: tuple(values) for name, values in out.items()}


def total(samples: Samples, name: str, **match: str) -> float | None:
    """The sum of ``name`` over label sets matching ``match``; None when the series is absent."""
    values = [
        v for labels, v in samples.get(name, ()) if all(labels.get(k) == want for k, want in match.items())
    ]
    return sum(values) if values else None


def scrape(url: str, client: httpx.Client, *, timeout_s: float = 2.0) -> tuple[Samples, str | None]:
    """``(samples, error)``: one GET of a ``/metrics`` endpoint, parsed."""
    try:
        response = client.get(url, timeout=timeout_s)
        if response.status_code != 200:
            return {}, f"GET {url} answered {response.status_code}"
        return parse(response.text), None
    except httpx.HTTPError as exc:
        return {}, f"GET {url}: {type(exc).__name__}: {exc}" if str(
            exc
        ) else f"GET {url}: {type(exc).__name__}"
    except ValueError as exc:  # the parser's complaint about a malformed exposition
        return {}, f"GET {url}: not Prometheus text ({exc})"


def _ratio(part: float | None, whole: float | None) -> float | None:
    return part / whole if part is not None and whole else None


@dataclass(frozen=True)
class EndpointSummary:
    """What one endpoint says about requests and caches (None: the series is not exported there)."""

    target: Target
    error: str | None = None
    requests: float | None = None
    failed_requests: float | None = None
    cached_tokens: float | None = None
    input_tokens: float | None = None
    kv_usage: float | None = None
    prefix_hits: float | None = None
    prefix_queries: float | None = None
    external_hits: float | None = None
    external_queries: float | None = None
    lmcache_hits: float | None = None
    lmcache_requested: float | None = None
    lmcache_local_usage_bytes: float | None = None
    l1_usage_ratio: float | None = None  # the multiprocess server's L1: used / capacity
    counters: Mapping[str, float] = field(default_factory=dict)

    @property
    def l1_capacity_bytes(self) -> float | None:
        """The server's L1 size, from its usage and ratio (unknown while the L1 is empty)."""
        return _ratio(self.lmcache_local_usage_bytes, self.l1_usage_ratio)

    @property
    def lmcache_hit_rate(self) -> float | None:
        return _ratio(self.lmcache_hits, self.lmcache_requested)

    @property
    def prefix_hit_rate(self) -> float | None:
        return _ratio(self.prefix_hits, self.prefix_queries)

    @property
    def cached_fraction(self) -> float | None:
        return _ratio(self.cached_tokens, self.input_tokens)

    def to_json(self) -> dict[str, object]:
        return {
            "process": self.target.process,
            "role": self.target.role,
            "gpu": self.target.gpu,
            "url": self.target.url,
            "error": self.error,
            "requests": self.requests,
            "failed_requests": self.failed_requests,
            "cached_tokens": self.cached_tokens,
            "input_tokens": self.input_tokens,
            "kv_cache_usage": self.kv_usage,
            "prefix_cache_hits": self.prefix_hits,
            "prefix_cache_queries": self.prefix_queries,
            "external_prefix_cache_hits": self.external_hits,
            "external_prefix_cache_queries": self.external_queries,
            "lmcache_hit_tokens": self.lmcache_hits,
            "lmcache_requested_tokens": self.lmcache_requested,
            "lmcache_hit_rate": self.lmcache_hit_rate,
            "lmcache_local_cache_usage_bytes": self.lmcache_local_usage_bytes,
            "l1_usage_ratio": self.l1_usage_ratio,
            "l1_capacity_bytes": self.l1_capacity_bytes,
        }


def summarize(target: Target, samples: Samples, error: str | None = None) -> EndpointSummary:
    if error is not None:
        return EndpointSummary(target, error=error)
    if target.role == "lmcache-server":
        ratios = [v for _, v in samples.get(MP_L1_RATIO, ())]
        return EndpointSummary(
            target,
            lmcache_hits=total(samples, MP_HITS),
            lmcache_requested=total(samples, MP_REQUESTED),
            lmcache_local_usage_bytes=total(samples, MP_L1_USAGE),
            l1_usage_ratio=max(ratios) if ratios else None,
            counters={name: v for name in (MP_HITS, MP_REQUESTED) if (v := total(samples, name)) is not None},
        )
    if target.role == "frontend":
        requests = total(samples, FRONTEND_REQUESTS)
        ok = total(samples, FRONTEND_REQUESTS, status="success")
        failed = None if requests is None else requests - (ok or 0.0)
    else:
        requests = total(samples, WORKER_REQUESTS, dynamo_endpoint="generate")
        failed = None
    usage = [v for _, v in samples.get(KV_USAGE, ())]
    return EndpointSummary(
        target,
        requests=requests,
        failed_requests=failed,
        cached_tokens=total(samples, FRONTEND_CACHED),
        input_tokens=total(samples, FRONTEND_INPUT),
        kv_usage=max(usage) if usage else None,
        prefix_hits=total(samples, PREFIX_HITS),
        prefix_queries=total(samples, PREFIX_QUERIES),
        external_hits=total(samples, EXTERNAL_HITS),
        external_queries=total(samples, EXTERNAL_QUERIES),
        lmcache_hits=total(samples, LMCACHE_HITS),
        lmcache_requested=total(samples, LMCACHE_REQUESTED),
        lmcache_local_usage_bytes=total(samples, LMCACHE_LOCAL_USAGE),
        counters={name: v for name in HIT_COUNTERS if (v := total(samples, name)) is not None},
    )


def collect(targets: Iterable[Target], *, timeout_s: float = 2.0) -> list[EndpointSummary]:
    """Scrape and summarise every target (one failing endpoint is reported, not raised)."""
    with httpx.Client(trust_env=False) as client:
        return [summarize(t, *scrape(t.url, client, timeout_s=timeout_s)) for t in targets]


def hit_counters(summaries: Iterable[EndpointSummary]) -> dict[str, float]:
    """The cache counters summed over the workers that export them."""
    out: dict[str, float] = {}
    for summary in summaries:
        if summary.target.role != "frontend":
            for name, value in summary.counters.items():
                out[name] = out.get(name, 0.0) + value
    return out
