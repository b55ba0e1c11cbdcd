"""LMCache's own servers as supervised processes, purely: the per-node cache server, lm://, Redis.

Three infrastructure roles, each started before the workers that use it and health-gated:

- ``lmcache-server``: LMCache's multiprocess cache server (``lmcache server``), one per node, from
  ``[lmcache.server]``. ZMQ on ``ports.base + 555``, HTTP (``/healthcheck``, ``/metrics``) on
  ``+ 556``, both on ``ports.host``. Workers that load LMCache then use ``LMCacheMPConnector`` with
  ``lmcache.mp.host`` / ``lmcache.mp.port`` pointed at it.
- ``lm-server``: ``lmcache_server HOST PORT``, for ``lmcache.remote.url = "lm://127.0.0.1:PORT"``
  with ``serve = true``. Probed with LMCache's own ``HEALTH`` command.
- ``redis``: ``redis-server`` for ``redis://127.0.0.1:PORT`` with ``serve = true``. Its whole
  configuration is on its command line (bind, port, maxmemory and policy, persistence, dir), so the
  plan shows every setting and render stays pure; there is no file to go stale. Probed with ``PING``.

Restart defaults follow what LMCache 0.5.6's clients do when their server restarts (measured by
scripts/lmcache_client_restart.py and scripts/lmcache_remote_restart.py, see docs/lmcache-servers.md):
the multiprocess client and redis-py reconnect by themselves, so nothing else restarts; the lm://
connector keeps its dead socket forever, so the workers that use it are restarted with it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from supervisor.errors import PlanError
from supervisor.plan.addresses import http_url, is_loopback, reachable, url_host
from supervisor.plan.infra import Claim, Node
from supervisor.plan.policies import probes, restart_policy
from supervisor.plan.spec import Condition, Dependency, HttpCheck, ProcessSpec, ProtocolCheck, Role

if TYPE_CHECKING:
    from supervisor.profile.schema import Profile, Remote

MP_PORT_OFFSET = 555
MP_HTTP_OFFSET = 556
CACHE_STARTUP_BUDGET_S = 120.0  # `lmcache server` imports torch: 4-10 s on a loaded 2-core machine
# lmcache_server (0.5.6) binds without SO_REUSEADDR: after a crash its port stays in TIME-WAIT/FIN-WAIT
# for ~60 s and every restart fails with "Address already in use" (seen here, tests/e2e). Run it through
# its own interpreter with SO_REUSEADDR set on its listening socket, as servers usually do.
LM_SERVER_SHIM = (
    "import socket, sys; bind = socket.socket.bind; "
    "socket.socket.bind = lambda s, a: (s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1), bind(s, a))[1]; "
    "from lmcache.v1.server.__main__ import main; sys.exit(main())"
)
SERVED_SCHEMES = {"lm": "lmcache_server", "redis": "redis-server"}
GIB = 1024**3


def served_endpoint(remote: Remote, source: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a remote the supervisor is asked to run; bad input raises PlanError."""
    key = "lmcache.remote.url"
    parts = urlsplit(remote.url)
    if parts.scheme not in SERVED_SCHEMES:
        raise PlanError(
            source,
            "lmcache.remote.serve",
            f"the supervisor can run lm:// and redis:// servers, not {parts.scheme}://; "
            "set serve = false and run that backend yourself",
        )
    host, port = parts.hostname or "", parts.port
    if not is_loopback(host):
        raise PlanError(
            source,
            key,
            f"serve = true runs the server on loopback only, but the URL's host is {host!r}; "
            "use 127.0.0.1 (one machine), or set serve = false and run a shared server yourself",
        )
    if port is None:
        raise PlanError(source, key, f"serve = true needs an explicit port in {parts.scheme}://{host}:PORT")
    if parts.password or parts.username:
        raise PlanError(
            source,
            key,
            "serve = true runs a loopback server without a password; remove the credentials from the URL",
        )
    if parts.path not in ("", "/") or parts.query:
        raise PlanError(
            source, key, f"serve = true takes {parts.scheme}://HOST:PORT only, without a path or query"
        )
    return parts.scheme, host, port


# Flags the plan sets on `lmcache server` itself: in lmcache.server.args they would fight it.
MP_MANAGED_FLAGS = {
    "--host": "ports.host",
    "--port": "lmcache.server.port",
    "--http-host": "ports.host",
    "--http-port": "lmcache.server.http_port",
    "--chunk-size": "lmcache.chunk_size",
    "--l1-size-gb": "lmcache.server.l1_size_gb",
    "--eviction-policy": "lmcache.server.eviction_policy",
    "--l2-adapter": "lmcache.server.l2_adapters",
}


def _managed_flag_error(args: list[str], source: str) -> PlanError | None:
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in MP_MANAGED_FLAGS:
            return PlanError(
                source,
                "lmcache.server.args",
                f"{flag} is set by the supervisor; use {MP_MANAGED_FLAGS[flag]}",
            )
    return None


def _binary(name: str, binaries: Mapping[str, str]) -> str:
    return name if "/" in name else binaries.get(name, name)


def mp_server_address(profile: Profile) -> tuple[str, int] | None:
    """Where workers reach this node's multiprocess server, or None without ``[lmcache.server]``."""
    server = profile.lmcache.server
    if server is None or not profile.lmcache.enabled:
        return None
    return reachable(profile.ports.host), server.port or profile.ports.base + MP_PORT_OFFSET


def mp_connector(profile: Profile) -> dict[str, object] | None:
    """The ``LMCacheMPConnector`` entry of a worker's ``--kv-transfer-config`` (LMCache 0.5.6 keys)."""
    address = mp_server_address(profile)
    if address is None:
        return None
    assert profile.lmcache.server is not None
    extra: dict[str, object] = {
        "lmcache.mp.host": f"tcp://{url_host(address[0])}",
        "lmcache.mp.port": address[1],
    }
    if profile.lmcache.server.heartbeat_interval_s is not None:
        extra["lmcache.mp.heartbeat_interval"] = profile.lmcache.server.heartbeat_interval_s
    return {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra}


def cache_server_processes(
    profile: Profile, here: Node, *, state: Path, claim: Claim, binaries: Mapping[str, str]
) -> list[ProcessSpec]:
    """This node's LMCache servers, in start order (none when LMCache is off)."""
    lm = profile.lmcache
    if not lm.enabled:
        return []
    src, out = profile.source, []
    if lm.server is not None and lm.remote is not None:
        raise PlanError(
            src,
            "lmcache.remote",
            "workers that use [lmcache.server] reach storage through that server, not lmcache.remote; "
            "give the server an L2 adapter (lmcache.server.l2_adapters) or drop [lmcache.server]",
        )
    if lm.server is not None and profile.engine == "vllm":
        from supervisor.profile.lmcache import worker_loads_lmcache

        for name, worker in profile.workers.items():
            if worker.role == "prefill" and worker_loads_lmcache(worker, lm):
                # Seen with the released engines (the `engine` check): kvbm 1.6.1 refuses it.
                raise PlanError(
                    src,
                    "lmcache.server",
                    f"prefill worker {name!r} would need LMCacheMPConnector inside PdConnector, which kvbm "
                    "1.6.1 refuses (its first connector must be LMCache, KVBM or FlexKV); use [lmcache.server] "
                    "with agg workers, or set workers.<prefill>.lmcache = false",
                )
    if lm.server is not None:
        server = lm.server
        error = _managed_flag_error(server.args, src)
        if error is not None:
            raise error
        _, port = mp_server_address(profile) or ("", 0)
        bind = profile.ports.host
        port = claim(port, "lmcache-server.zmq", "lmcache.server.port")
        http = claim(
            server.http_port or profile.ports.base + MP_HTTP_OFFSET,
            "lmcache-server.http",
            "lmcache.server.http_port",
        )
        url = http_url(bind, http)
        argv = [
            _binary(server.binary, binaries),
            "server",
            "--host",
            bind,
            "--port",
            str(port),
            "--http-host",
            bind,
            "--http-port",
            str(http),
            "--chunk-size",
            str(lm.chunk_size),
            "--l1-size-gb",
            f"{server.l1_size_gb:g}",
            "--eviction-policy",
            server.eviction_policy,
        ]
        for adapter in server.l2_adapters:
            argv += ["--l2-adapter", json.dumps(adapter, separators=(",", ":"), sort_keys=True)]
        out.append(
            ProcessSpec(
                name="lmcache-server",
                role=Role.LMCACHE_SERVER,
                argv=(*argv, *server.args),
                env={
                    "LMCACHE_DISABLE_BANNER": "1",
                    "LMCACHE_TRACK_USAGE": "true" if lm.track_usage else "false",
                    "LMCACHE_LOG_LEVEL": lm.log_level,
                    **server.env,
                },
                gpus=(),
                ports={"zmq": port, "http": http},
                probes=probes(
                    server.health,
                    HttpCheck(
                        url=f"{url}/healthcheck", json_field="status", json_value="healthy", owned_port=http
                    ),
                    HttpCheck(url=f"{url}/healthcheck", owned_port=http),
                    CACHE_STARTUP_BUDGET_S,
                ),
                restart=restart_policy(server.restart),
                stop_timeout_s=server.stop_timeout_s,
                bind_host=bind,
                multiproc_dir="",
                log_file=str(state / "logs" / "lmcache-server.log"),
                memory_gb=server.l1_size_gb,
            )
        )
    if lm.remote is not None and lm.remote.serve:
        if here.role != "all":
            raise PlanError(
                src,
                "lmcache.remote.serve",
                "serve = true runs a loopback server that other machines cannot reach; "
                "run a shared server yourself for several machines",
            )
        out.append(_remote_server(profile, lm.remote, state=state, claim=claim, binaries=binaries))
    return out


def _remote_server(
    profile: Profile, remote: Remote, *, state: Path, claim: Claim, binaries: Mapping[str, str]
) -> ProcessSpec:
    from supervisor.profile.schema import Restart

    scheme, host, port = served_endpoint(remote, profile.source)
    settings = remote.server
    binary = _binary(settings.binary or SERVED_SCHEMES[scheme], binaries)
    name = "lm-server" if scheme == "lm" else "redis"
    claim(port, f"{name}.port", "lmcache.remote.url")
    if scheme == "lm":
        interpreter = binaries.get(f"{binary}#python")
        argv: list[str] = [interpreter, "-c", LM_SERVER_SHIM] if interpreter else [binary]
        argv += [host, str(port)]
        protocol = "lm-health"
        # LMCache's lm:// connector never reconnects: its workers must restart with the server.
        restart = settings.restart or Restart(restart_dependents=True)
        memory = 0.0  # lmcache_server has no size limit: it holds what the workers put
        env = {"LMCACHE_DISABLE_BANNER": "1", "LMCACHE_LOG_LEVEL": profile.lmcache.log_level}
    else:
        # The state directory exists before any spawn (logs live in it); an AOF lands in its appendonlydir.
        argv = [
            binary,
            "--bind",
            host,
            "--port",
            str(port),
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--dir",
            str(state),
            "--maxmemory",
            str(int(settings.maxmemory_gb * GIB)),
            "--maxmemory-policy",
            settings.maxmemory_policy,
        ]
        argv += (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if settings.persistence
            else [
                "--save",
                "",
                "--appendonly",
                "no",
            ]
        )
        protocol = "redis-ping"
        restart = settings.restart or Restart()  # redis-py reconnects by itself
        memory = settings.maxmemory_gb
        env = {}
    probe = ProtocolCheck(protocol=protocol, host=host, port=port, owned_port=port)  # type: ignore[arg-type]
    return ProcessSpec(
        name=name,
        role=Role.LM_SERVER if scheme == "lm" else Role.REDIS,
        argv=(*argv, *settings.args),
        env=env,
        gpus=(),
        ports={"port": port},
        probes=probes(settings.health, probe, probe, CACHE_STARTUP_BUDGET_S),
        restart=restart_policy(restart),
        stop_timeout_s=settings.stop_timeout_s,
        bind_host=host,
        multiproc_dir="",
        log_file=str(state / "logs" / f"{name}.log"),
        memory_gb=memory,
    )


def cache_dependencies(servers: list[ProcessSpec]) -> tuple[Dependency, ...]:
    """A worker that loads LMCache starts only once this node's LMCache servers answer their probes."""
    return tuple(Dependency(spec.name, Condition.HEALTHY) for spec in servers)
