"""One home for address rules: wildcards, loopback, and URLs a client can use (IPv6 bracketed)."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import CLI

from supervisor.plan import addresses


@pytest.mark.parametrize(
    ("bind", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:80/x"),
        ("0.0.0.0", "http://127.0.0.1:80/x"),
        ("", "http://127.0.0.1:80/x"),
        ("::", "http://[::1]:80/x"),
        ("::1", "http://[::1]:80/x"),
        ("fd00::5", "http://[fd00::5]:80/x"),
        ("cache.internal", "http://cache.internal:80/x"),
    ],
)
def test_http_url_reaches_the_bind_from_this_machine(bind: str, url: str) -> None:
    assert addresses.http_url(bind, 80, "/x") == url


@pytest.mark.parametrize(
    ("host", "local", "specific"),
    [
        ("0.0.0.0", True, False),
        ("::", True, False),
        ("127.0.0.2", True, False),
        ("::1", True, False),
        ("localhost", True, False),
        ("10.0.0.5", False, True),
        ("node7", False, True),
    ],
)
def test_local_and_specific_are_opposites(host: str, local: bool, specific: bool) -> None:
    assert addresses.is_local(host) is local
    assert addresses.is_specific(host) is specific


def _urls(value: object) -> list[str]:
    """Every http:// string anywhere in a JSON document."""
    if isinstance(value, str):
        return [value] if "http://" in value else []
    if isinstance(value, dict):
        return [u for v in value.values() for u in _urls(v)]
    if isinstance(value, list):
        return [u for v in value for u in _urls(v)]
    return []


def test_plan_on_ipv6_loopback_brackets_every_url() -> None:
    """`plan demo --set ports.host="::1"` once rendered http://::1:18081/health, which no client can use.

    The frontend has its own bind (``frontend.host``): set to ::1 too, every URL of the plan (probes,
    base URL, ready URL, metrics targets) must be the bracketed form."""
    sets = ["--set", 'ports.host="::1"', "--set", 'frontend.host="::1"']
    done = subprocess.run([CLI, "plan", "demo", *sets, "--json"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    urls = _urls(json.loads(done.stdout))
    assert urls, "the plan names no URL at all"
    probe_urls = [u for u in urls if "/health" in u or "/live" in u]
    assert probe_urls, urls
    for url in urls:
        assert "http://[::1]:" in url, url
