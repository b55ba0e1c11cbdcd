"""Is the cache working? The same long prompt twice through the frontend, timed and counted.

Each request streams (``stream_options.include_usage``) so that the time to first token can be
measured from sending the request to the first chunk that carries a choice (Dynamo sends the
assistant-role chunk together with the first generated token) or usage; the final chunk's usage
gives ``prompt_tokens_details.cached_tokens``, the tokens the engine did not prefill again. The
workers' cache counters (LMCache hit tokens, vLLM prefix-cache hits, see :mod:`supervisor.control.scrape`)
are scraped before and after each request, and their change is reported where they exist.

The prompt starts with a random nonce, so the first request cannot hit what an earlier run left
in the cache; the second is byte-identical to the first. Nothing here claims a hit it did not see:
:attr:`SmokeReport.reuse_seen` is true only when the repeat reported cached tokens or a hit counter grew.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from supervisor.control import scrape

# Short, common English words: about one token each for Llama/Qwen/GPT tokenizers.
_WORDS = (
    "the",
    "cache",
    "keeps",
    "every",
    "prefix",
    "once",
    "so",
    "that",
    "later",
    "requests",
    "reuse",
    "it",
    "and",
    "skip",
    "work",
    "on",
    "each",
    "node",
    "with",
    "a",
    "long",
    "shared",
    "context",
    "window",
)


def long_prompt(tokens: int, *, nonce: str | None = None) -> str:
    """About ``tokens`` tokens of text, opened by a nonce unique to this run."""
    nonce = nonce or secrets.token_hex(8)
    words = [_WORDS[(i * 7 + i // len(_WORDS)) % len(_WORDS)] for i in range(max(tokens - 8, 1))]
    return f"Run {nonce}. " + " ".join(words)


@dataclass(frozen=True)
class Attempt:
    """One streamed request: timings, token counts and the change of the workers' cache counters."""

    ttft_s: float | None
    total_s: float
    prompt_tokens: int | None
    cached_tokens: int | None
    completion_tokens: int | None
    counters_delta: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SmokeReport:
    """Both attempts; ``run_delta`` is the counters' change over the whole run, read after LMCache's
    periodic stats flush had up to ``settle_s`` to land (its counters lag the requests by seconds)."""

    attempts: tuple[Attempt, ...]
    prompt_tokens_requested: int
    counters_present: tuple[str, ...]
    run_delta: Mapping[str, float] = field(default_factory=dict)

    @property
    def reuse_seen(self) -> bool:
        """The repeat reported cached tokens, or a hit counter grew during it."""
        repeat = self.attempts[-1]
        hits = (scrape.LMCACHE_HITS, scrape.PREFIX_HITS, scrape.EXTERNAL_HITS)
        return (
            bool(repeat.cached_tokens)
            or any(repeat.counters_delta.get(name, 0.0) > 0 for name in hits)
            or (self.run_delta.get(scrape.LMCACHE_HITS, 0.0) > 0)
        )

    def to_json(self) -> dict[str, object]:
        return {
            "prompt_tokens_requested": self.prompt_tokens_requested,
            "reuse_seen": self.reuse_seen,
            "counters_present": list(self.counters_present),
            "run_delta": dict(self.run_delta),
            "attempts": [
                {
                    "ttft_s": a.ttft_s,
                    "total_s": a.total_s,
                    "prompt_tokens": a.prompt_tokens,
                    "cached_tokens": a.cached_tokens,
                    "completion_tokens": a.completion_tokens,
                    "counters_delta": dict(a.counters_delta),
                }
                for a in self.attempts
            ],
        }


class SmokeError(Exception):
    """A smoke request failed (the caller turns it into a ControlError with the deployment's name)."""


def stream_once(
    client: httpx.Client, url: str, model: str, prompt: str, *, max_tokens: int, timeout_s: float
) -> Attempt:
    """POST one streaming chat completion and time it; raises :class:`SmokeError` on any failure."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage: dict[str, object] = {}
    first: float | None = None
    started = time.monotonic()
    try:
        with client.stream("POST", url, json=body, timeout=timeout_s) as response:
            if response.status_code != 200:
                response.read()
                raise SmokeError(f"POST {url} answered {response.status_code}: {response.text[:200]}")
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise SmokeError(f"POST {url}: a stream chunk is not JSON: {data[:100]}") from None
                if "error" in chunk:
                    raise SmokeError(f"POST {url}: the stream reported an error: {str(chunk['error'])[:200]}")
                if first is None and (chunk.get("choices") or chunk.get("usage")):
                    first = time.monotonic() - started
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except httpx.HTTPError as exc:
        raise SmokeError(f"POST {url}: {type(exc).__name__}: {exc}") from None
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Attempt(
        ttft_s=first,
        total_s=time.monotonic() - started,
        prompt_tokens=_int(usage.get("prompt_tokens")),
        cached_tokens=_int(cached),
        completion_tokens=_int(usage.get("completion_tokens")),
    )


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def run(
    base_url: str,
    model: str,
    targets: Sequence[scrape.Target],
    *,
    prompt_tokens: int = 2048,
    max_tokens: int = 8,
    timeout_s: float = 120.0,
    settle_s: float = 15.0,
    counters: Callable[[Sequence[scrape.Target]], dict[str, float]] | None = None,
) -> SmokeReport:
    """Send the same long prompt twice; report both attempts and the workers' counter changes."""
    url = base_url.rstrip("/") + "/v1/chat/completions"
    read = counters or (lambda ts: scrape.hit_counters(scrape.collect(ts)))
    workers = [t for t in targets if t.role != "frontend"]
    prompt = long_prompt(prompt_tokens)
    attempts = []
    present: set[str] = set()
    with httpx.Client(trust_env=False) as client:
        before = start = read(workers)
        for _ in range(2):
            attempt = stream_once(client, url, model, prompt, max_tokens=max_tokens, timeout_s=timeout_s)
            after = read(workers)
            present |= set(after)
            delta = {name: after[name] - before.get(name, 0.0) for name in after}
            attempts.append(
                Attempt(
                    attempt.ttft_s,
                    attempt.total_s,
                    attempt.prompt_tokens,
                    attempt.cached_tokens,
                    attempt.completion_tokens,
                    delta,
                )
            )
            before = after
    deadline = time.monotonic() + settle_s
    # LMCache publishes its counters from a periodic stats thread: wait (bounded) for them to move.
    while (
        scrape.LMCACHE_REQUESTED in before
        and before[scrape.LMCACHE_REQUESTED] == start.get(scrape.LMCACHE_REQUESTED)
        and time.monotonic() < deadline
    ):
        time.sleep(0.5)
        before = read(workers)
    run_delta = {name: before[name] - start.get(name, 0.0) for name in before}
    return SmokeReport(tuple(attempts), prompt_tokens, tuple(sorted(present)), run_delta)
