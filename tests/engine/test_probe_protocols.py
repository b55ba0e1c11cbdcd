"""The protocol probes against real peers: a real redis-server, a refused port, a server that answers
something else. (``lm-health`` against the real ``lmcache_server`` runs in tests/e2e/test_lmcache_servers.py.)"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import httpx
import pytest
from proctools import free_port

from supervisor.engine.probe_protocols import LM_KEY_LENGTH, LM_REQUEST
from supervisor.engine.probes import run_check
from supervisor.plan.spec import ProtocolCheck

pytestmark = pytest.mark.anyio


@pytest.fixture
def client() -> Iterator[httpx.AsyncClient]:
    yield httpx.AsyncClient(trust_env=False)


def one_answer(reply: bytes) -> tuple[int, threading.Thread, list[bytes]]:
    """A listener that reads one request, answers ``reply`` and closes."""
    server = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            got.append(conn.recv(4096))
            conn.sendall(reply)
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server.getsockname()[1], thread, got


async def test_redis_ping_against_a_real_redis(redis_factory, client: httpx.AsyncClient) -> None:
    server = redis_factory()
    ok = await run_check(ProtocolCheck("redis-ping", "127.0.0.1", server.port), client=client, timeout_s=2)
    assert ok.ok, ok.error
    # LMCache's HEALTH frame is no Redis command: Redis answers an error, never code 200.
    wrong = await run_check(ProtocolCheck("lm-health", "127.0.0.1", server.port), client=client, timeout_s=2)
    assert not wrong.ok and wrong.error.startswith("HEALTH to 127.0.0.1")


async def test_refused_port_fails_both(client: httpx.AsyncClient) -> None:
    port = free_port()
    for protocol in ("redis-ping", "lm-health"):
        result = await run_check(ProtocolCheck(protocol, "127.0.0.1", port), client=client, timeout_s=1)
        assert not result.ok and "refused" in result.error


async def test_lm_health_sends_lmcache_frame_and_reads_the_code(client: httpx.AsyncClient) -> None:
    port, thread, got = one_answer(struct.pack("9i", 200, 0, 1, 2, 0, 0, 0, 0, 0))
    ok = await run_check(ProtocolCheck("lm-health", "127.0.0.1", port), client=client, timeout_s=2)
    thread.join(5)
    assert ok.ok, ok.error
    assert got == [LM_REQUEST] and len(LM_REQUEST) == 36 + LM_KEY_LENGTH
    assert struct.unpack("i", LM_REQUEST[:4])[0] == 5  # ClientCommand.HEALTH
    assert LM_REQUEST[36:].decode().strip().count("@") == 4  # a key LMCache can parse, space-padded
    port, thread, _ = one_answer(struct.pack("9i", 400, 0, 1, 2, 0, 0, 0, 0, 0))
    fail = await run_check(ProtocolCheck("lm-health", "127.0.0.1", port), client=client, timeout_s=2)
    thread.join(5)
    assert not fail.ok and "code 400" in fail.error


async def test_redis_loading_is_not_healthy(client: httpx.AsyncClient) -> None:
    port, thread, got = one_answer(b"-LOADING Redis is loading the dataset in memory\r\n")
    result = await run_check(ProtocolCheck("redis-ping", "127.0.0.1", port), client=client, timeout_s=2)
    thread.join(5)
    assert got == [b"PING\r\n"] and not result.ok and "LOADING" in result.error
