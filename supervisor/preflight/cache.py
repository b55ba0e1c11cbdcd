"""Preflight for the KV cache: an operator's LMCACHE_CONFIG_FILE read as LMCache reads it, and the
remote cache (Redis, lm://, ...) reachable before any worker counts on it. Pure, like every check."""

from __future__ import annotations

from supervisor.host.facts import HostFacts
from supervisor.plan.spec import Plan
from supervisor.preflight.findings import Finding, fail, gib, ok, warn
from supervisor.preflight.needs import (
    CONFIG_FILE_ENV,
    lmcache_file_of,
    lmcache_processes,
    parse_remote_url,
    remote_urls,
    served_by_plan,
)
from supervisor.profile.lmcache import check_env_value

DOWN_HINT = (
    "start the backend or fix lmcache.remote.url: LMCache does not stop on a down remote, it only "
    "warns and serves 0 hits"
)


def check_lmcache_config(plan: Plan, facts: HostFacts) -> list[Finding]:
    """An operator's LMCACHE_CONFIG_FILE: LMCache must load it and read its values as meant, and a key
    whose value the supervisor's env replaces is named (LMCache lets the env win over the file)."""
    users = [spec for spec in lmcache_processes(plan) if spec.env.get(CONFIG_FILE_ENV)]
    if not users:
        return [ok("lmcache-config", "no LMCACHE_CONFIG_FILE: LMCache reads only the plan's LMCACHE_* env")]
    out = []
    for spec in users:
        where = f"{spec.name}: LMCACHE_CONFIG_FILE {spec.env[CONFIG_FILE_ENV]}"
        found = lmcache_file_of(spec, facts.lmcache_files)
        if found is None:
            out.append(warn("lmcache-config", f"{where} was not read"))
            continue
        if found.problem:
            out.append(
                fail(
                    "lmcache-config",
                    f"{where} {found.problem}",
                    "LMCache fails at start without a readable file: fix it or drop the variable",
                )
            )
            continue
        misread = [f"{key}: {why}" for key, value in found.values if (why := check_env_value(key, value))]
        if misread:
            out.append(fail("lmcache-config", f"{where}: {'; '.join(misread)}", "fix the value in the file"))
        replaced = [
            f"{key}={value} (the env sets {spec.env[_env_name(key)]})"
            for key, value in found.values
            if not _same_value(spec.env[_env_name(key)], value)
        ]
        if replaced:
            out.append(
                warn(
                    "lmcache-config",
                    f"{where}: the env wins over {', '.join(replaced)}",
                    "set these in the profile's lmcache section (or lmcache.extra), not in the file",
                )
            )
        if not misread and not replaced:
            keys = ", ".join(key for key, _ in found.values) or "no keys"
            out.append(ok("lmcache-config", f"{where} loads ({keys}); checked with the env below"))
    return out


def _env_name(key: str) -> str:
    return f"LMCACHE_{key.upper()}"


def _same_value(a: str, b: str) -> bool:
    """Whether LMCache reads the two texts alike: "5" and "5.0", "True" and "true" are one value."""
    if a.strip().lower() == b.strip().lower():
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def check_remote_cache(plan: Plan, facts: HostFacts) -> list[Finding]:
    out = []
    for url, spec in remote_urls(plan):
        target, why = parse_remote_url(url, dict(spec.env))
        if target is None:
            out.append(
                fail(
                    "remote-cache",
                    f"LMCACHE_REMOTE_URL {url} {why}",
                    "write it as redis://host:port, redis-sentinel://h1:p1,h2:p2, lm://host:port",
                )
            )
            continue
        local = next(filter(None, (served_by_plan(plan, h, p) for h, p in target.endpoints)), None)
        found = facts.remote(url)
        if local:
            out.append(
                ok(
                    "remote-cache",
                    f"{url} is served by {local.owner} in this plan (its port is "
                    "checked under ports; it is not pinged before start)",
                )
            )
        elif found is None:
            out.append(warn("remote-cache", f"{url} was not probed"))
        elif not found.probed:
            out.append(
                warn(
                    "remote-cache",
                    f"{url}: {found.detail}; reachability unknown",
                    "check the backend by hand before relying on its hits",
                )
            )
        elif not found.reachable:
            out.append(fail("remote-cache", f"{url} is unreachable: {found.problem}", DOWN_HINT))
        elif found.maxmemory == 0:
            out.append(
                warn(
                    "remote-cache",
                    f"{url}: {found.detail}, but its maxmemory is 0 (no limit) and "
                    "LMCache stores keys without a TTL, so the cache grows until the Redis host "
                    "runs out of memory",
                    "set maxmemory (e.g. `CONFIG SET maxmemory 8gb`) with maxmemory-policy allkeys-lru",
                )
            )
        elif found.policy == "noeviction":
            out.append(
                warn(
                    "remote-cache",
                    f"{url}: {found.detail}, but maxmemory-policy is noeviction: "
                    "LMCache's writes fail once maxmemory is reached",
                    "set maxmemory-policy allkeys-lru",
                )
            )
        else:
            limit = "" if found.maxmemory is None else f", maxmemory {gib(found.maxmemory)}"
            out.append(ok("remote-cache", f"{url}: {found.detail}{limit}"))
    return out or [ok("remote-cache", "no remote cache configured")]
