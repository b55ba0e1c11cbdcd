"""Probes that speak a server's own protocol, for servers whose open port proves too little.

- ``redis-ping``: ``PING`` must answer ``+PONG`` (a Redis still loading its data answers ``-LOADING``).
- ``lm-health``: LMCache 0.5.6's ``lmcache_server`` (behind ``lm://`` URLs) has a ``HEALTH`` command
  (``lmcache.v1.protocol.ClientCommand.HEALTH`` = 5) answered with return code 200. The request is
  LMCache's fixed-size ``ClientMetaMessage``: nine int32 fields, then a 150-byte key; the server parses
  the key even for HEALTH (an empty one kills its connection thread), so a well-formed dummy key is sent.
  The answer is a ``ServerMetaMessage``: nine int32 fields, the first the return code.
"""

from __future__ import annotations

import struct

import anyio

from supervisor.plan.spec import ProtocolCheck

LM_HEALTH = 5
LM_SUCCESS = 200
LM_KEY_LENGTH = 150
LM_PROBE_KEY = b"lmcache-supervise@1@0@0@half"  # model@world_size@worker_id@chunk_hash@dtype
# Space-padded as LMCache pads it (the server strips spaces; NUL padding makes it drop the connection).
LM_REQUEST = struct.pack(
    f"9i{LM_KEY_LENGTH}s", LM_HEALTH, 0, 1, 0, 0, 0, 0, 0, 0, LM_PROBE_KEY.ljust(LM_KEY_LENGTH)
)
LM_REPLY_LENGTH = 4 * 9


async def _read(stream: anyio.abc.ByteStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        try:
            chunk = await stream.receive(n - len(data))
        except anyio.EndOfStream:
            break
        data += chunk
    return data


async def exchange(check: ProtocolCheck, timeout_s: float) -> str | None:
    """None when the server answered as a healthy one does, else what went wrong."""
    deadline = anyio.current_time() + timeout_s
    with anyio.fail_after(timeout_s):
        stream = await anyio.connect_tcp(check.host, check.port)
    command = "PING" if check.protocol == "redis-ping" else "HEALTH"
    where = f"{check.host}:{check.port}"
    async with stream:
        with anyio.move_on_at(deadline):
            if check.protocol == "redis-ping":
                await stream.send(b"PING\r\n")
                line = await stream.receive(256)
                if not line.startswith(b"+PONG"):
                    return f"PING to {where} answered {line.strip()[:80]!r}, expected +PONG"
                return None
            await stream.send(LM_REQUEST)
            reply = await _read(stream, LM_REPLY_LENGTH)
            if len(reply) < LM_REPLY_LENGTH:
                return f"HEALTH to {where} got {len(reply)} bytes back, expected {LM_REPLY_LENGTH}"
            code = struct.unpack("i", reply[:4])[0]
            if code != LM_SUCCESS:
                return f"HEALTH to {where} answered code {code}, expected {LM_SUCCESS}"
            return None
    return f"{command} to {where}: no answer within {timeout_s:g} s"
