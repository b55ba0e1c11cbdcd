"""Reachability of LMCache's remote backends, for preflight: Redis (plain, TLS, sentinel, cluster) and TCP.

A tiny RESP2 client over a socket stands in for redis-py: preflight needs five commands (AUTH, PING,
INFO, SENTINEL, CLUSTER INFO), and the supervisor should not carry a client library, nor its
connection pools and retries, to ask them once with a short timeout.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

# A sentinel only answers SENTINEL/PING; every other address here is a data node.
REDIS_SCHEMES = ("redis", "rediss", "redis-sentinel", "redis-cluster")
TCP_SCHEMES = ("lm", "infinistore")


class RespError(Exception):
    """The server answered with an error reply (``-ERR ...``, ``-NOAUTH ...``, ``-WRONGPASS ...``)."""


@dataclass(frozen=True)
class RemoteTarget:
    """A parsed ``LMCACHE_REMOTE_URL``: where to knock and with what. ``url`` keeps the secret, so
    only ever show it through :func:`supervisor.redact.redact_text`."""

    url: str
    scheme: str
    endpoints: tuple[tuple[str, int], ...]
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    service_name: str | None = None  # sentinel master name (REDIS_SERVICE_NAME)


@dataclass(frozen=True)
class RemoteFacts:
    """What probing a remote backend found. ``maxmemory``/``policy`` come from Redis INFO when readable."""

    url: str
    reachable: bool
    problem: str | None = None
    detail: str = ""
    maxmemory: int | None = None
    policy: str | None = None
    probed: bool = True


class _Conn:
    """One RESP2 connection; every call has the socket timeout of its creation."""

    def __init__(self, host: str, port: int, timeout: float, tls: bool) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls:
            import ssl  # only rediss:// needs it; its import costs every start ~10 ms

            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        self._sock = sock
        self._file = sock.makefile("rb")

    def __enter__(self) -> _Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()
        self._sock.close()

    def call(self, *args: str) -> Any:
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(parts))
        return self._read()

    def _line(self) -> bytes:
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed by the server")
        return line[:-2]

    def _read(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode(errors="replace")
        if kind == b"-":
            raise RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self._file.read(size + 2)
            return data[:-2].decode(errors="replace")
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self._read() for _ in range(size)]
        raise ConnectionError(f"not a Redis reply: {line[:40]!r}")


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _auth(conn: _Conn, target: RemoteTarget) -> None:
    if target.password is None:
        return
    if target.username:
        conn.call("AUTH", target.username, target.password)
    else:
        conn.call("AUTH", target.password)


def _info_memory(conn: _Conn) -> tuple[int | None, str | None]:
    """maxmemory and its policy from ``INFO memory``; None where ACLs or renamed commands hide them."""
    try:
        text = conn.call("INFO", "memory")
    except RespError:
        return None, None
    fields = dict(
        line.split(":", 1) for line in str(text).splitlines() if ":" in line and not line.startswith("#")
    )
    raw = fields.get("maxmemory", "").strip()
    return (int(raw) if raw.isdigit() else None), (fields.get("maxmemory_policy", "").strip() or None)


def _probe_node(target: RemoteTarget, host: str, port: int, timeout: float, *, cluster: bool) -> RemoteFacts:
    where = _where(host, port)
    with _Conn(host, port, timeout, tls=target.scheme == "rediss") as conn:
        _auth(conn, target)
        reply = conn.call("PING")
        if reply != "PONG":
            return RemoteFacts(target.url, False, f"{where} answered PING with {reply!r}, not PONG")
        maxmemory, policy = _info_memory(conn)
        detail = f"{where} answers PING"
        if cluster:
            try:
                info = str(conn.call("CLUSTER", "INFO"))
            except RespError as exc:
                return RemoteFacts(target.url, False, f"{where} is not a cluster node ({exc})")
            state = next(
                (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("cluster_state:")),
                "unknown",
            )
            if state != "ok":
                return RemoteFacts(
                    target.url,
                    False,
                    f"{where} reports cluster_state:{state}",
                    maxmemory=maxmemory,
                    policy=policy,
                )
            detail += ", cluster_state:ok"
        return RemoteFacts(target.url, True, None, detail, maxmemory, policy)


def _probe_sentinel(target: RemoteTarget, timeout: float) -> RemoteFacts:
    if not target.service_name:
        return RemoteFacts(
            target.url,
            False,
            "REDIS_SERVICE_NAME is not set, so LMCache cannot ask the sentinels for a master",
        )
    failures: list[str] = []
    for host, port in target.endpoints:
        where = _where(host, port)
        try:
            with _Conn(host, port, timeout, tls=False) as conn:
                try:
                    addr = conn.call("SENTINEL", "get-master-addr-by-name", target.service_name)
                except RespError as exc:
                    if "NOAUTH" not in str(exc):
                        raise
                    _auth(conn, target)  # sentinels with requirepass share the data password here
                    addr = conn.call("SENTINEL", "get-master-addr-by-name", target.service_name)
        except (OSError, RespError) as exc:
            failures.append(f"sentinel {where}: {_reason(exc)}")
            continue
        if not addr:
            failures.append(f"sentinel {where} knows no master named {target.service_name!r}")
            continue
        master_host, master_port = str(addr[0]), int(addr[1])
        try:
            found = _probe_node(target, master_host, master_port, timeout, cluster=False)
        except (OSError, RespError) as exc:
            return RemoteFacts(
                target.url,
                False,
                f"sentinel {where} names master "
                f"{_where(master_host, master_port)}, which fails: {_reason(exc)}",
            )
        return RemoteFacts(
            target.url,
            found.reachable,
            found.problem,
            f"sentinel {where} -> master {found.detail}",
            found.maxmemory,
            found.policy,
        )
    return RemoteFacts(target.url, False, "; ".join(failures) or "no sentinel address in the URL")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, RespError):
        text = str(exc)
        if text.startswith(("NOAUTH", "WRONGPASS", "ERR invalid password", "ERR AUTH")):
            return f"authentication failed ({text.split(' ', 1)[0]})"
        return text
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def probe_remote(target: RemoteTarget, timeout: float) -> RemoteFacts:
    """PING a Redis-family backend (with its maxmemory) or open a TCP connection to ``lm://``-style ones."""
    if target.scheme == "redis-sentinel":
        return _probe_sentinel(target, timeout)
    if target.scheme not in REDIS_SCHEMES + TCP_SCHEMES:
        return RemoteFacts(target.url, True, None, f"{target.scheme}:// is not probed", probed=False)
    if not target.endpoints:
        return RemoteFacts(target.url, False, "no host:port in the URL")
    if target.scheme in TCP_SCHEMES:
        host, port = target.endpoints[0]
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as exc:
            return RemoteFacts(target.url, False, f"{_where(host, port)}: {_reason(exc)}")
        return RemoteFacts(target.url, True, None, f"{_where(host, port)} accepts TCP connections")
    failures: list[str] = []
    for host, port in target.endpoints:  # a cluster URL may list several seeds; one good one will do
        try:
            found = _probe_node(target, host, port, timeout, cluster=target.scheme == "redis-cluster")
        except (OSError, RespError, ValueError) as exc:
            failures.append(f"{_where(host, port)}: {_reason(exc)}")
            continue
        if found.reachable:
            return found
        failures.append(found.problem or "")
    return RemoteFacts(target.url, False, "; ".join(failures))
