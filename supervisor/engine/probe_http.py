"""A lean HTTP client for health probes, the deployment gate and its smoke request: a fresh
connection per check, a non-blocking socket, no pool. httpx serves only ``https://`` checks.

Why not httpx here: importing it costs ~50 ms of CPU, which would land while the children start;
its connection pool walks every pooled connection on each request, and its lock set-up retries a failing
``import sniffio`` on every request where sniffio is not installed, so each probe cost about
1-2 ms of CPU and grew with the number of children: 128 idle children with the default probes
took ~10 % of a core (``scripts/bench.py``), against ~2 % this way. Kubernetes' kubelet probes the
same way, one new connection per probe, which also means a restarted child is never judged on a
connection to its previous incarnation.

We close the connection ourselves once the answer is complete (by Content-Length or chunked
framing; read to EOF otherwise), so the TIME_WAIT lands on our ephemeral port, never on the
child's health port, which its next incarnation must be able to bind.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import time
import urllib.parse

import anyio

#: An answer larger than this is not a health answer; reading stops there.
MAX_ANSWER_BYTES = 1 << 20
_CHUNK = 1 << 16


class NoAnswer(Exception):
    """Connected, but no complete answer arrived before the deadline."""


def _parse(data: bytes, *, eof: bool) -> tuple[int, bytes] | None:
    """``(status, body)`` once ``data`` holds a whole answer; None while more is needed.

    Raises ValueError for something that is not HTTP/1.x, or that ended (``eof``) half-way.
    """
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            if eof:
                raise ValueError("no complete HTTP answer")
            return None
        status_line, *lines = head.split(b"\r\n")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP answer: {status_line[:60]!r}")
        status = int(parts[1])
        if 100 <= status < 200:  # an interim answer (103 Early Hints): the real one follows
            data = body
            continue
        break
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        decoded = _dechunk(body)
        if decoded is None and eof:
            raise ValueError("the chunked answer ended early")
        return None if decoded is None else (status, decoded)
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        if len(body) >= length:
            return status, body[:length]
        if eof:
            raise ValueError(f"the answer ended after {len(body)} of {length} bytes")
        return None
    return (status, body) if eof else None  # no framing: the body runs until the server closes


def _dechunk(body: bytes) -> bytes | None:
    out, pos = bytearray(), 0
    while True:
        end = body.find(b"\r\n", pos)
        if end < 0:
            return None
        size = int(body[pos:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        if len(body) < end + 2 + size + 2:
            return None
        out += body[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


async def _address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # a name: resolved off the event loop thread by anyio
        family, _, _, _, sockaddr = (await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
        return family, (str(sockaddr[0]), int(sockaddr[1]))
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (host, port)


async def get(url: str, *, timeout_s: float) -> tuple[int, bytes]:
    """GET an ``http://`` URL within ``timeout_s``; returns ``(status, body)``.

    Raises TimeoutError (no connection in time), :class:`NoAnswer` (connected, no whole answer in
    time), OSError (refused, unreachable, reset) or ValueError (not HTTP, or cut short).
    """
    return await fetch("GET", url, timeout_s=timeout_s)


async def fetch(
    method: str, url: str, *, timeout_s: float, json_body: bytes | None = None
) -> tuple[int, bytes]:
    """:func:`get`, for any method, with an optional JSON body (the gate's smoke request)."""
    deadline = time.monotonic() + timeout_s
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not an http:// URL: {url}")
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rpartition("@")[2]
    head = f"{method} {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: lmcache-supervise\r\nAccept: */*\r\n"
    if json_body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(json_body)}\r\n"
    request = (head + "\r\n").encode() + (json_body or b"")
    with anyio.fail_after(timeout_s):
        family, address = await _address(parts.hostname, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        with anyio.fail_after(max(0.0, deadline - time.monotonic())):
            err = sock.connect_ex(address)
            if err == errno.EINPROGRESS:
                await anyio.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        data, answer = b"", None
        with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
            while request:
                try:
                    request = request[sock.send(request) :]
                except BlockingIOError:
                    await anyio.wait_writable(sock)
            while answer is None:
                try:
                    chunk = sock.recv(_CHUNK)
                except BlockingIOError:
                    await anyio.wait_readable(sock)
                    continue
                data += chunk
                if len(data) > MAX_ANSWER_BYTES:
                    raise ValueError(f"the answer is larger than {MAX_ANSWER_BYTES} bytes")
                answer = _parse(data, eof=not chunk)
        if answer is None:
            raise NoAnswer(f"no answer within {timeout_s:g} s")
        return answer
    finally:
        sock.close()
