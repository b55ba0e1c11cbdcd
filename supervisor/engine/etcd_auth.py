"""The ``etcd-auth`` check: etcd's authentication is on and the cluster credentials log in.

etcd cannot start with auth on: it is turned on through its API once it runs. This check, the
head's etcd's startup and readiness probe, does that through etcd's HTTP gateway (v3 JSON API,
no etcdctl needed): log in as the root user; when that fails because auth is still off, add the
root user (an "already exists" answer is fine: a half-done earlier attempt), grant it the root role,
enable auth, and log in again. Every step is idempotent, so an attempt cut short by the probe's
timeout is finished by the next one. Dependents (the frontend) start only after it passed, so no
Dynamo process ever meets an etcd with auth still off. The data directory keeps auth on across
restarts; a credentials file that no longer matches it is reported, never "fixed".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from supervisor.host import credentials
from supervisor.plan.addresses import http_url
from supervisor.plan.spec import ProtocolCheck

if TYPE_CHECKING:
    import httpx


def _problem(response: httpx.Response) -> str:
    try:
        body: Any = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    message = body.get("message") or body.get("error") if isinstance(body, dict) else None
    return str(message or f"HTTP {response.status_code}")


async def ensure(check: ProtocolCheck, client: httpx.AsyncClient, timeout_s: float) -> str | None:
    """None once auth is on and the credentials log in, else what is wrong (never a secret)."""
    values = await anyio.to_thread.run_sync(credentials.read, check.credentials_file)
    user, password = values["ETCD_AUTH_USERNAME"], values["ETCD_AUTH_PASSWORD"]
    base = http_url(check.host, check.port)

    async def post(path: str, body: dict[str, str]) -> httpx.Response:
        return await client.post(f"{base}/v3/{path}", json=body, timeout=timeout_s)

    login = {"name": user, "password": password}
    first = await post("auth/authenticate", login)
    if first.status_code == 200 and first.json().get("token"):
        return None
    if "not enabled" not in _problem(first):
        return f"etcd at {base} refuses the credentials in {check.credentials_file}: {_problem(first)}"
    added = await post("auth/user/add", {"name": user, "password": password})
    if added.status_code != 200 and "already exists" not in _problem(added):
        return f"etcd at {base}: adding its {user} user failed: {_problem(added)}"
    granted = await post("auth/user/grant", {"user": user, "role": "root"})
    if granted.status_code != 200:
        return f"etcd at {base}: granting {user} the root role failed: {_problem(granted)}"
    enabled = await post("auth/enable", {})
    if enabled.status_code != 200:
        return f"etcd at {base}: enabling auth failed: {_problem(enabled)}"
    again = await post("auth/authenticate", login)
    if again.status_code == 200 and again.json().get("token"):
        return None
    return f"etcd at {base}: auth is on but the credentials do not log in: {_problem(again)}"
