"""Addresses, in one place: which binds are wildcards or loopback, and how a client writes a URL to them.

Every URL the plan renders (probes, the frontend's base URL, etcd/NATS endpoints, metrics targets)
goes through :func:`http_url`, so an IPv6 literal is bracketed everywhere (``http://[::1]:8000``),
and a wildcard bind is reached through the loopback address of its own family.
"""

from __future__ import annotations

import ipaddress

WILDCARDS = ("0.0.0.0", "::", "")


def is_wildcard(host: str) -> bool:
    return host in WILDCARDS


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback literal (``127.0.0.0/8``, ``::1``); a wildcard is not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_local(host: str) -> bool:
    """A bind that this machine's own clients reach: a wildcard or a loopback address."""
    return is_wildcard(host) or is_loopback(host)


def is_specific(host: str) -> bool:
    """A concrete non-loopback address or name: one other machines could reach."""
    return not is_local(host)


def reachable(host: str) -> str:
    """The address to connect to a socket bound to ``host`` from this machine."""
    if host == "::":
        return "::1"
    return "127.0.0.1" if is_wildcard(host) else host


def url_host(host: str) -> str:
    """``host`` as it appears in a URL: IPv6 literals in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def client_host(host: str) -> str:
    """A bind address as a client on this machine writes it in a URL."""
    return url_host(reachable(host))


def http_url(host: str, port: int, path: str = "") -> str:
    """``http://HOST:PORT/path`` for a socket bound to ``host``, as a client on this machine reaches it."""
    return f"http://{client_host(host)}:{port}{path}"
