"""The README's firewall rule for open cluster planes, as the two-namespace test runs it.

The rule is read from README.md itself (the ``nft`` and ``iptables`` lines of the block in "Several
machines"), so the test runs what operators are told to run; only the address of the nodes and the
API's port are replaced by the test's own. A TCP probe then tells an allowed client from a stranger.
"""

from __future__ import annotations

import errno
import shlex
import socket
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
# What the README's example uses, replaced by the test's own values.
EXAMPLE_NODES, EXAMPLE_API = "10.0.0.0/24", "8000"


def readme_rule(tool: str, nodes: str, api_port: int) -> list[list[str]]:
    """The README's rule for ``tool`` ("nft" or "iptables"): its first run of lines that start with
    the tool's name, as argv lists, with ``nodes`` for the example's node network and ``api_port``
    for its API port. Fails if the README no longer has the block or its placeholders."""
    lines = [line.strip() for line in README.read_text().splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{tool} "))
    commands: list[list[str]] = []
    for line in lines[start:]:
        if not line.startswith(f"{tool} "):
            break
        commands.append(shlex.split(line))
    text = "\n".join(" ".join(c) for c in commands)
    assert EXAMPLE_NODES in text and EXAMPLE_API in text, f"README's {tool} rule changed its example:\n{text}"
    return [
        [w.replace(EXAMPLE_NODES, nodes).replace(EXAMPLE_API, str(api_port)) for w in c] for c in commands
    ]


def probe(host: str, port: int, *, source: str, timeout: float) -> str:
    """Open a TCP connection from ``source`` to ``host:port``: "connected", "refused" (nothing
    listens, or a reset) or "timed out" (the SYN went unanswered: dropped)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as conn:
        conn.bind((source, 0))
        conn.settimeout(timeout)
        try:
            conn.connect((host, port))
        except TimeoutError:
            return "timed out"
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET):
                return "refused"
            raise
        return "connected"
