"""The probes' lean HTTP GET against real loopback sockets: framing, errors, and who closes first."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import anyio
import pytest
from conftest import free_port_base

from supervisor.engine import probe_http
from supervisor.engine.probes import run_check
from supervisor.plan.spec import HttpCheck

pytestmark = pytest.mark.anyio


class Canned:
    """A one-connection-at-a-time server that answers every request with ``answer(request)``.

    ``closed_by_client`` records, per connection, whether the client closed before we did.
    """

    def __init__(self, answer: Callable[[bytes], bytes | None], *, close_after: bool = False) -> None:
        self.answer, self.close_after = answer, close_after
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.closed_by_client: list[bool] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    data = conn.recv(4096)
                    if not data:
                        break
                    request += data
                self.requests.append(request)
                reply = self.answer(request)
                if reply is None:  # never answer: hold the connection until the client gives up
                    conn.recv(1)
                    continue
                conn.sendall(reply)
                if self.close_after:  # an answer without framing ends when we close
                    continue
                conn.settimeout(2.0)
                try:
                    self.closed_by_client.append(conn.recv(1) == b"")
                except OSError:
                    self.closed_by_client.append(False)

    def url(self, path: str = "/health") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def canned() -> Iterator[Callable[[Callable[[bytes], bytes | None]], Canned]]:
    servers: list[Canned] = []

    def make(answer: Callable[[bytes], bytes | None], **options: bool) -> Canned:
        servers.append(Canned(answer, **options))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def fixed(reply: bytes) -> Callable[[bytes], bytes]:
    return lambda request: reply


async def test_content_length_answer_and_we_close_first(canned) -> None:
    server = canned(fixed(b'HTTP/1.1 200 OK\r\nContent-Length: 19\r\n\r\n{"status": "ready"}'))
    status, body = await probe_http.get(server.url("/health?x=1"), timeout_s=2)
    assert (status, body) == (200, b'{"status": "ready"}')
    assert server.requests[0].startswith(b"GET /health?x=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}".encode() in server.requests[0]
    # We close once the answer is whole: the TIME_WAIT is ours, not on the child's health port.
    with anyio.fail_after(3):  # the server's thread records it after our close
        while not server.closed_by_client:
            await anyio.sleep(0.01)
    assert server.closed_by_client == [True]


async def test_chunked_interim_and_unframed_answers(canned) -> None:
    chunked = canned(
        fixed(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Service Unavailable\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n4\r\n{"a"\r\n3;ext=1\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n'
        )
    )
    assert await probe_http.get(chunked.url(), timeout_s=2) == (503, b'{"a": 1}')
    unframed = canned(fixed(b"HTTP/1.0 200 OK\r\n\r\nplain body"), close_after=True)
    assert await probe_http.get(unframed.url(), timeout_s=2) == (200, b"plain body")


async def test_errors_are_the_probe_messages(canned) -> None:
    import httpx

    async with httpx.AsyncClient(trust_env=False) as client:
        refused = await run_check(
            HttpCheck(url=f"http://127.0.0.1:{free_port_base(1)}/health"), client=client, timeout_s=1
        )
        assert refused.error == "connection refused"
        silent = canned(lambda request: None)
        hung = await run_check(HttpCheck(url=silent.url()), client=client, timeout_s=0.3)
        assert hung.error == "no answer within 0.3 s" and 0.25 < hung.latency_s < 1.0
        garbage = canned(fixed(b"SSH-2.0-OpenSSH\r\n\r\n"), close_after=True)
        bad = await run_check(HttpCheck(url=garbage.url()), client=client, timeout_s=1)
        assert bad.error is not None and "not an HTTP answer" in bad.error
        short = canned(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), close_after=True)
        cut = await run_check(HttpCheck(url=short.url()), client=client, timeout_s=1)
        assert cut.error is not None and "3 of 10 bytes" in cut.error
        not_json = canned(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
        nj = await run_check(
            HttpCheck(url=not_json.url(), json_field="status", json_value="ready"), client=client, timeout_s=1
        )
        assert nj.error == f"GET {not_json.url()} did not answer JSON"
