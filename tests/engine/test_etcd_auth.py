"""The ``etcd-auth`` check against a real etcd: it turns auth on once (idempotently), logs in with
the cluster credentials, and afterwards an anonymous client is refused while /health still answers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import wait_for
from proctools import free_port

from supervisor.engine.probes import run_check
from supervisor.host import credentials
from supervisor.plan.spec import ProtocolCheck

pytestmark = pytest.mark.anyio
ETCD = str(Path(sys.executable).parent / "etcd")


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[int]:
    """A real one-member etcd on loopback, with its data in tmp_path."""
    client, peer = free_port(), free_port()
    proc = subprocess.Popen(
        [
            ETCD,
            "--data-dir",
            str(tmp_path / "etcd"),
            "--listen-client-urls",
            f"http://127.0.0.1:{client}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{client}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"default=http://127.0.0.1:{peer}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ},
    )
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{client}/health", timeout=1).json()["health"] == "true"
            except (httpx.HTTPError, ValueError):
                return False

        wait_for(healthy, 30, interval=0.1, what="etcd healthy")
        yield client
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_the_check_turns_auth_on_once_and_anonymous_clients_are_refused(
    etcd: int, tmp_path: Path
) -> None:
    secret = tmp_path / "state" / "cluster-credentials"
    secret.parent.mkdir(mode=0o700)
    values = credentials.generate(secret)
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    assert credentials.generate(secret) == values  # generated once, then kept
    base = f"http://127.0.0.1:{etcd}"
    put = {"key": "a2V5", "value": "dmFsdWU="}  # base64 "key" = "value"
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.post(f"{base}/v3/kv/put", json=put)).status_code == 200  # open before
        check = ProtocolCheck("etcd-auth", "127.0.0.1", etcd, credentials_file=str(secret))
        for _ in range(2):  # the second run finds auth on and only logs in
            result = await run_check(check, client=client, timeout_s=10)
            assert result.ok, result.error
        anonymous = await client.post(f"{base}/v3/kv/put", json=put)
        assert anonymous.status_code != 200 and "user name is empty" in anonymous.text
        login = {"name": values["ETCD_AUTH_USERNAME"], "password": values["ETCD_AUTH_PASSWORD"]}
        token = (await client.post(f"{base}/v3/auth/authenticate", json=login)).json()["token"]
        authed = await client.post(f"{base}/v3/kv/put", json=put, headers={"Authorization": token})
        assert authed.status_code == 200, authed.text
        assert (await client.get(f"{base}/health")).json()["health"] == "true"  # probes still work

        # A credentials file that no longer matches etcd's data is reported, secret unquoted.
        other = tmp_path / "other"
        other.mkdir(mode=0o700)
        wrong = credentials.generate(other / "cluster-credentials")
        result = await run_check(
            ProtocolCheck(
                "etcd-auth", "127.0.0.1", etcd, credentials_file=str(other / "cluster-credentials")
            ),
            client=client,
            timeout_s=10,
        )
        assert not result.ok and "refuses the credentials" in (result.error or "")
        assert wrong["ETCD_AUTH_PASSWORD"] not in (result.error or "")


def test_a_missing_or_open_credentials_file_is_one_clear_error(tmp_path: Path) -> None:
    from supervisor.errors import StateDirError

    path = tmp_path / "cluster-credentials"
    with pytest.raises(StateDirError, match="cluster-credentials is missing: copy the head's"):
        credentials.read(path)
    credentials.generate(path)
    path.chmod(0o644)
    with pytest.raises(StateDirError, match="readable by others"):
        credentials.read(path)
    path.chmod(0o600)
    path.write_text("ETCD_AUTH_USERNAME=root\nETCD_AUTH_PASSWORD=x y\nNATS_AUTH_TOKEN=t\n")
    with pytest.raises(StateDirError, match="line 2") as error:
        credentials.read(path)
    assert "x y" not in str(error.value)


def test_prepare_creates_the_heads_files_and_refuses_a_worker_node_without_a_copy(tmp_path: Path) -> None:
    from supervisor.errors import StateDirError
    from supervisor.plan import render as planmod
    from supervisor.profile import load as profiles

    loaded = profiles.load(
        "demo",
        overrides=(
            'discovery.backend="etcd"',
            'discovery.event_plane="nats"',
            "discovery.insecure_planes=true",
        ),
    )
    head = planmod.render(loaded, state_root=tmp_path / "h", node_role="head", advertise="10.9.0.1")
    worker = planmod.render(
        loaded, state_root=tmp_path / "w", node_role="worker", head="10.9.0.1", advertise="10.9.0.2"
    )
    for plan in (head, worker):
        Path(plan.deployment.state_dir).mkdir(parents=True, mode=0o700)
    with pytest.raises(StateDirError, match="cluster-credentials is missing") as refused:
        credentials.prepare(worker)
    assert refused.value.exit_code == 2
    credentials.prepare(head)
    state = Path(head.deployment.state_dir)
    values = credentials.read(state / "cluster-credentials")
    config = state / "nats-auth.conf"
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert f'token: "{values["NATS_AUTH_TOKEN"]}"' in config.read_text()
    credentials.prepare(head)  # a second up keeps the same secrets
    assert credentials.read(state / "cluster-credentials") == values
