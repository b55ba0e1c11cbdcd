"""Health checks (http, tcp, exec) with Kubernetes thresholds, and the port-ownership test.

A check returns a :class:`~supervisor.engine.states.ProbeResult` value (ok, latency, error) and never
raises for an unhealthy target. :class:`Tally` applies a probe's success/failure thresholds to a
run of results. :func:`port_owned_by_tree` answers "does the socket listening on this port belong
to this child or its descendants?": a Dynamo worker whose health port was taken keeps running
without a health server, so an answer on that port may come from a stranger.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import psutil

from supervisor.engine import etcd_auth, probe_http, probe_protocols
from supervisor.engine.proctree import descendants
from supervisor.engine.states import ProbeResult
from supervisor.host import ports
from supervisor.plan.spec import (
    Check,
    ExecCheck,
    HttpCheck,
    Probe,
    Probes,
    ProtocolCheck,
    SmokeRequest,
    TcpCheck,
)

if TYPE_CHECKING:
    import httpx

#: Probe cadence while a process is starting: a dependent starts within about this of its health.
FAST_PROBE_S = 0.1
#: How long a process that was never ready keeps being probed fast (then at its normal period).
FAST_WINDOW_S = 120.0
#: A port's owner, once verified for a pid, is trusted this long before it is checked again.
OWNER_RECHECK_S = 30.0
_MISSING = object()
_owner_verified: dict[tuple[int, int], float] = {}
#: How old the host's socket table may be when it names a port's stranger (ports.snapshot).
STRANGER_CACHE_S = 1.0


@dataclass(frozen=True)
class Tally:
    """Consecutive successes/failures of one probe and its verdict (Kubernetes semantics).

    ``passing`` flips to True after ``success_threshold`` successes in a row and to False after
    ``failure_threshold`` failures in a row; in between it keeps its last value.
    """

    passing: bool = False
    successes: int = 0
    failures: int = 0

    def observe(self, ok: bool, probe: Probe) -> Tally:
        if ok:
            successes = self.successes + 1
            passing = self.passing or successes >= max(probe.success_threshold, 1)
            return Tally(passing=passing, successes=successes, failures=0)
        failures = self.failures + 1
        passing = self.passing and failures < max(probe.failure_threshold, 1)
        return Tally(passing=passing, successes=0, failures=failures)


def port_owned_by_tree(port: int, pid: int) -> tuple[bool, str | None]:
    """Whether a TCP socket listening on ``port`` belongs to ``pid`` or one of its descendants.

    Returns ``(owned, error)``; ``error`` says who holds the port instead, when that is knowable.
    Only the child's own tree is scanned (cheap: its fds and /proc/<pid>/net/tcp*), not the host.
    """
    for member in (pid, *descendants(pid)):
        try:
            conns = psutil.Process(member).net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns):
            return True, None
    return False, f"port {port} is not held by pid {pid} or its descendants ({_stranger(port)})"


def _stranger(port: int) -> str:
    """Best-effort name of whoever listens on ``port`` (only for the error message). The host's
    socket table is read at most once per :data:`STRANGER_CACHE_S` for all ports together: a worker
    whose port is taken is probed every 0.1 s while it starts, and the answer changes rarely."""
    held = ports.holder(port, table=ports.snapshot(STRANGER_CACHE_S))
    if held is None:
        return "nobody listens there"
    return f"held by pid {held.pid}" if held.pid else "held by another user's process"


def _json_field(payload: Any, dotted: str) -> Any:
    value = payload
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


async def _http(check: HttpCheck, client: httpx.AsyncClient, timeout_s: float) -> str | None:
    try:
        status, body = await _send(client, "GET", check.url, timeout_s=timeout_s)
    except probe_http.NoAnswer:
        return f"no answer within {timeout_s:g} s"
    except ValueError as exc:
        return f"GET {check.url}: {exc}"
    if status != check.status:
        return f"GET {check.url} answered {status}, expected {check.status}"
    if check.json_field:
        try:
            got = _json_field(json.loads(body), check.json_field)
        except ValueError:
            return f"GET {check.url} did not answer JSON"
        if got is _MISSING:
            return f"GET {check.url}: no field {check.json_field!r} in the answer"
        if got != check.json_value:
            return f"GET {check.url}: {check.json_field} is {got!r}, expected {check.json_value!r}"
    return None


async def _tcp(check: TcpCheck, timeout_s: float) -> str | None:
    with anyio.fail_after(timeout_s):
        stream = await anyio.connect_tcp(check.host, check.port)
    await stream.aclose()
    return None


async def _exec(check: ExecCheck, timeout_s: float) -> str | None:
    """Run ``argv`` in its own group, no shell, waiting on a pidfd (no thread, no poll loop)."""
    try:
        proc = subprocess.Popen(  # noqa: ASYNC220  (a spawn only; the wait below is on a pidfd)
            check.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        return f"{check.argv[0]}: {exc.strerror or exc}"
    pidfd = os.pidfd_open(proc.pid)
    try:
        with anyio.move_on_after(timeout_s):
            await anyio.wait_readable(pidfd)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"{check.argv[0]} did not finish within {timeout_s:g} s"
    finally:
        os.close(pidfd)
        if proc.poll() is None:  # cancelled from outside: never leave the check behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return None if proc.returncode == 0 else f"{check.argv[0]} exited with {proc.returncode}"


async def run_check(
    check: Check,
    *,
    client: httpx.AsyncClient,
    timeout_s: float,
    owner_pid: int | None = None,
) -> ProbeResult:
    """Run one check once. ``owner_pid``: the child whose tree must own ``check.owned_port``."""
    started = time.monotonic()
    try:
        if isinstance(check, HttpCheck):
            error = await _http(check, client, timeout_s)
        elif isinstance(check, TcpCheck):
            error = await _tcp(check, timeout_s)
        elif isinstance(check, ProtocolCheck) and check.protocol == "etcd-auth":
            error = await etcd_auth.ensure(check, client, timeout_s)
        elif isinstance(check, ProtocolCheck):
            error = await probe_protocols.exchange(check, timeout_s)
        else:
            error = await _exec(check, timeout_s)
    except TimeoutError:
        error = f"no connection within {timeout_s:g} s"
    except OSError as exc:
        error = _describe_oserror(exc)
    except Exception as exc:
        if (error := _httpx_failure(exc, timeout_s)) is None:
            raise
    owned_port = getattr(check, "owned_port", None)
    if error is None and owned_port is not None and owner_pid is not None:
        # Checked after a success only: a refused connection needs no owner, and a success from a
        # stranger must not count. Once verified, a child keeps its listening socket, so the
        # (costly: it reads the tree's fds) check is repeated only every OWNER_RECHECK_S.
        key, now = (owner_pid, owned_port), time.monotonic()
        if now - _owner_verified.get(key, -OWNER_RECHECK_S) >= OWNER_RECHECK_S:
            # /proc reads (the tree's fds, the host's socket table for a stranger): off the loop.
            owned, why = await anyio.to_thread.run_sync(port_owned_by_tree, owned_port, owner_pid)
            if owned:
                if len(_owner_verified) > 4096:  # pids of long-gone children
                    _owner_verified.clear()
                _owner_verified[key] = now
            else:
                _owner_verified.pop(key, None)
                error = why
    return ProbeResult(ok=error is None, latency_s=time.monotonic() - started, error=error)


def _httpx_failure(exc: Exception, timeout_s: float) -> str | None:
    """What an httpx call (an HTTPS check, etcd-auth) failed with; None for any other exception.
    httpx is looked up, not imported: if it raised, it was imported."""
    httpx = sys.modules.get("httpx")
    if httpx is None or not isinstance(exc, httpx.HTTPError):
        return None
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {timeout_s:g} s"
    return _describe_oserror(exc)


async def _send(
    client: httpx.AsyncClient, method: str, url: str, *, timeout_s: float, json_body: bytes | None = None
) -> tuple[int, bytes]:
    """One request: ``http://`` on the lean path (``probe_http``), ``https://`` through ``client``.
    Raises TimeoutError or :class:`probe_http.NoAnswer`, OSError, ValueError, or httpx's errors."""
    if url.startswith("http://"):
        return await probe_http.fetch(method, url, timeout_s=timeout_s, json_body=json_body)
    headers = {"Content-Type": "application/json"} if json_body is not None else None
    response = await client.request(method, url, content=json_body, headers=headers, timeout=timeout_s)
    return response.status_code, response.content


def _request_failure(exc: Exception, timeout_s: float) -> str | None:
    """Why :func:`_send` raised, in a few words; None for an exception that is not a request's."""
    if isinstance(exc, (TimeoutError, probe_http.NoAnswer)):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, (OSError, ValueError)):
        return _describe_oserror(exc)
    return _httpx_failure(exc, timeout_s)


def _describe_oserror(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED:
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def worker_counts(payload: Any) -> dict[str, int]:
    """Workers per type from the frontend's model-ready answer (summed over namespaces)."""
    counts: dict[str, int] = {}
    namespaces = payload.get("namespaces") if isinstance(payload, dict) else None
    for namespace in (namespaces or {}).values():
        for kind, info in ((namespace or {}).get("worker_types") or {}).items():
            if isinstance(info, dict) and isinstance(info.get("workers"), int):
                counts[kind] = counts.get(kind, 0) + info["workers"]
    return counts


async def deployment_ready(
    url: str,
    *,
    client: httpx.AsyncClient,
    max_workers: Mapping[str, int] | None = None,
    timeout_s: float = 2.0,
) -> tuple[ProbeResult, dict[str, int]]:
    """GET the frontend's model-ready URL: 200 once every needed worker type registered.

    Returns the result and the worker counts it reported. ``max_workers`` (per worker type) also
    fails the check while the frontend counts MORE workers than that: after a SIGKILL, a dead
    worker's registration lingers until removed (the runner does so for file discovery) or until
    its etcd lease lapses, and requests routed to it fail meanwhile.
    """
    started = time.monotonic()
    counts: dict[str, int] = {}
    try:
        status, body = await _send(client, "GET", url, timeout_s=timeout_s)
        error = None if status == 200 else f"GET {url} answered {status}"
        try:
            counts = worker_counts(json.loads(body))
        except ValueError:
            pass
    except Exception as exc:
        if (why := _request_failure(exc, timeout_s)) is None:
            raise
        error = f"GET {url}: {why}"
    if error is None and max_workers:
        extra = {k: n for k, n in counts.items() if k in max_workers and n > max_workers[k]}
        if extra:
            error = "frontend still counts workers that are gone: " + ", ".join(
                f"{k} {n} > {max_workers[k]}" for k, n in sorted(extra.items())
            )
    return ProbeResult(ok=error is None, latency_s=time.monotonic() - started, error=error), counts


async def smoke(
    base_url: str, model: str, request: SmokeRequest, *, client: httpx.AsyncClient
) -> ProbeResult:
    """Send one small OpenAI chat completion; any 200 proves the request path end to end."""
    started = time.monotonic()
    url = base_url.rstrip("/") + request.path
    if url.endswith("/v1/v1/chat/completions"):  # base_url may already carry /v1
        url = url.replace("/v1/v1/", "/v1/")
    body = {
        "model": model,
        "messages": [{"role": "user", "content": request.prompt}],
        "max_tokens": request.max_tokens,
    }
    try:
        status, answer = await _send(
            client, "POST", url, timeout_s=request.timeout_s, json_body=json.dumps(body).encode()
        )
        text = answer[:200].decode(errors="replace")
        error = None if status == 200 else f"POST {url} answered {status}: {text}"
    except Exception as exc:
        if (why := _request_failure(exc, request.timeout_s)) is None:
            raise
        error = f"POST {url}: {why}"
    return ProbeResult(ok=error is None, latency_s=time.monotonic() - started, error=error)


async def watch_health(
    probes: Probes,
    *,
    pid: int,
    started_at: float,
    client: httpx.AsyncClient,
    record: Callable[[ProbeResult], None],
    started: Callable[[], None],
    readiness: Callable[[bool, str], None],
) -> str:
    """Probe one incarnation of a process the Kubernetes way; returns only with a reason to kill it.

    The startup probe runs every ``min(period, FAST_PROBE_S)`` until it passes (then ``started()``)
    or its budget ``initial_delay + period * failure_threshold`` is spent (returns). Readiness then
    runs at once, fast until the first success, and reports verdict changes via ``readiness``
    (never kills); liveness past its failure threshold returns. A check shared by readiness and
    liveness runs once per tick.
    """

    async def check(probe: Probe) -> ProbeResult:
        result = await run_check(probe.check, client=client, timeout_s=probe.timeout_s, owner_pid=pid)
        record(result)
        return result

    startup = probes.startup
    if startup is not None:
        budget = startup.initial_delay_s + startup.period_s * startup.failure_threshold
        await anyio.sleep(startup.initial_delay_s)
        tally, tick = Tally(), time.monotonic()
        while True:
            result = await check(startup)
            tally = tally.observe(result.ok, startup)
            if tally.passing:
                break
            if time.monotonic() - started_at >= budget:
                return f"startup probe did not pass within {budget:g} s: {result.error}"
            tick += min(startup.period_s, FAST_PROBE_S)
            await anyio.sleep(max(0.0, tick - time.monotonic()))
    started()
    ready, live = probes.readiness, probes.liveness
    now = time.monotonic()
    due: dict[str, float] = {}
    tallies = {"ready": Tally(), "live": Tally()}
    if ready is not None:
        due["ready"] = now if startup else now + ready.initial_delay_s
    if live is not None:
        due["live"] = now + max(live.initial_delay_s, live.period_s if startup else 0.0)
    if not due:
        await anyio.sleep_forever()
    ever_ready = False
    while True:
        await anyio.sleep(max(0.0, min(due.values()) - time.monotonic()))
        now = time.monotonic()
        done: list[tuple[Check, ProbeResult]] = []  # one run per distinct check per tick
        for kind, probe in (("ready", ready), ("live", live)):
            if probe is None or due[kind] > now:
                continue
            cached = next((r for c, r in done if c == probe.check), None)
            result = cached if cached is not None else await check(probe)
            if cached is None:
                done.append((probe.check, result))
            before = tallies[kind]
            tallies[kind] = tally = before.observe(result.ok, probe)
            period = probe.period_s
            if kind == "live":
                if tally.failures >= max(probe.failure_threshold, 1):
                    return f"liveness probe failed {tally.failures} times: {result.error}"
            else:
                if tally.passing != before.passing or (tally.passing and not ever_ready):
                    readiness(tally.passing, "ready" if tally.passing else (result.error or "not ready"))
                ever_ready = ever_ready or tally.passing
                if not ever_ready and now - started_at < FAST_WINDOW_S:
                    period = min(period, FAST_PROBE_S)
            due[kind] = now + period
