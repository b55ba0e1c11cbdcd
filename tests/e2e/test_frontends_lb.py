"""Two frontends behind HAProxy, run as docs/reliability.md tells an operator to (scripts/frontends_lb.py).

A restart of the supervised frontend (SIGTERM: Dynamo's drain answers 503 to new requests, /health
turns 503) fails no request through the load balancer; its SIGKILL cuts only the streams that were
going through it (a load balancer cannot move a stream halfway), never refuses a new one.
"""

from __future__ import annotations

from pathlib import Path

import frontends_lb
import pytest

pytestmark = pytest.mark.e2e


def test_a_frontend_restart_behind_haproxy_fails_nothing(tmp_path: Path) -> None:
    figures = frontends_lb.run(tmp_path, restarts=1, kills=1, clients=4, min_requests=120)
    restart, kill = figures["phases"]["restart 1"], figures["phases"]["sigkill 1"]
    assert restart["sent"] >= 8 and restart["failed"] == 0, figures
    # The SIGKILL: only streams cut mid-way, at most those in flight through it (half the clients).
    assert kill["failed"] <= 2 and not any("HTTP" in reason for reason in kill["reasons"]), figures
    assert figures["requests"] >= 120 and figures["failed"] == kill["failed"], figures
