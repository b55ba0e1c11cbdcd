"""The supervisor's own Prometheus metrics, and a ``file_sd`` targets file for the workers' metrics.

:class:`SupervisorMetrics` is a runner observer plus a runner service. Its metrics live in a
private :class:`~prometheus_client.CollectorRegistry` (never the global one: the supervisor
imports libraries that register there) and are served by prometheus_client's HTTP server thread
on ``plan.deployment.metrics_host:metrics_port`` (loopback by default; nothing when the port is
None)::

    lmcache_supervise_process_up{deployment,process,role}                   1 when healthy
    lmcache_supervise_process_state{deployment,process,role,state}          1 for the current state
    lmcache_supervise_process_restarts_total{deployment,process,role}       counter
    lmcache_supervise_process_last_exit_code{deployment,process,role}       exit code, 128+N for signal N
    lmcache_supervise_process_start_time_seconds{deployment,process,role}   unix time of the current pid
    lmcache_supervise_probe_latency_seconds{deployment,process,role}        histogram
    lmcache_supervise_deployment_state{deployment,state}                    1 for the current state
    lmcache_supervise_deployment_time_to_ready_seconds{deployment}          first READY after start
    lmcache_supervise_role_healthy_replicas{deployment,role}                healthy replicas of a role
    lmcache_supervise_role_replicas{deployment,role}                        replicas planned (min_ready: _role_min_ready)
    lmcache_supervise_gpu_healthy{deployment,gpu,uuid}                      1 unless quarantined
    lmcache_supervise_gpu_faults_total{deployment,gpu,uuid,class}           counter (fatal, app, info)

Probe results are sampled from the runner's status every :data:`SAMPLE_S` (the runner emits no
event per probe): every result at the steady probe period (5 s), a sample of the 0.1 s startup probes.

The targets file (``plan.deployment.targets_file``, Prometheus ``file_sd_configs`` JSON) lists each
worker's ``DYN_SYSTEM_PORT`` ``/metrics`` (which carries the vLLM and LMCache series) and the
frontend's, labelled deployment/process/role/gpu. It is written atomically (tmp + rename) when the
supervision starts and again on every process state change whose plan changed it (a reload), and
removed at shutdown so Prometheus stops scraping ports nobody serves.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from supervisor.control.progress import Timeline
from supervisor.control.status import roles_view
from supervisor.engine.states import DeploymentState, DeploymentStatus, ProcessState, RunnerEvent
from supervisor.eventlog import log
from supervisor.plan.addresses import client_host
from supervisor.plan.spec import Plan, ProcessSpec, Role

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

PREFIX = "lmcache_supervise"
SAMPLE_S = 1.0
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PROCESS_STATES = tuple(dict.fromkeys(state.summary for state in ProcessState))
DEPLOYMENT_STATES = tuple(s.value for s in DeploymentState)


class _Source(Protocol):
    plan: Plan

    def status(self) -> DeploymentStatus: ...


def _metrics_port(spec: ProcessSpec) -> int | None:
    if spec.role in (Role.FRONTEND, Role.LMCACHE_SERVER):  # LMCache's server: /metrics beside /healthcheck
        return spec.ports.get("http")
    return spec.ports.get("system") if spec.role.is_worker else None


def targets(plan: Plan) -> list[dict[str, Any]]:
    """The file_sd document: one entry per worker (and the frontend, and LMCache's multiprocess cache
    server) that serves ``/metrics``."""
    out = []
    for spec in plan.processes:
        port = _metrics_port(spec)
        if port is None:
            continue
        out.append(
            {
                "targets": [f"{client_host(spec.bind_host)}:{port}"],
                "labels": {
                    "deployment": plan.deployment.name,
                    "process": spec.name,
                    "role": spec.role.value,
                    "gpu": ",".join(str(g) for g in spec.gpus),
                },
            }
        )
    return out


def write_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over: readers never see half."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # Prometheus usually runs as its own user
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Series:
    """The metrics themselves, in a private registry. Made when the service starts: importing
    prometheus_client (~30 ms) must not delay the first spawn."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        labels = ("deployment", "process", "role")
        r = self.registry
        self.up = Gauge(f"{PREFIX}_process_up", "1 while the process is healthy", labels, registry=r)
        self.state = Gauge(
            f"{PREFIX}_process_state", "1 for the process's current state", (*labels, "state"), registry=r
        )
        self.restarts = Counter(f"{PREFIX}_process_restarts", "Restarts of the process", labels, registry=r)
        self.last_exit = Gauge(
            f"{PREFIX}_process_last_exit_code",
            "Exit code of the last exit; 128+N when signal N killed it",
            labels,
            registry=r,
        )
        self.start_time = Gauge(
            f"{PREFIX}_process_start_time_seconds", "Unix time the current pid started", labels, registry=r
        )
        self.probe = Histogram(
            f"{PREFIX}_probe_latency_seconds",
            "Health probe latency",
            labels,
            buckets=PROBE_BUCKETS,
            registry=r,
        )
        self.deployment_state = Gauge(
            f"{PREFIX}_deployment_state",
            "1 for the deployment's current state",
            ("deployment", "state"),
            registry=r,
        )
        self.time_to_ready = Gauge(
            f"{PREFIX}_deployment_time_to_ready_seconds",
            "Seconds from the start of supervision to the first ready",
            ("deployment",),
            registry=r,
        )
        role_labels = ("deployment", "role")
        self.role_healthy = Gauge(
            f"{PREFIX}_role_healthy_replicas", "Healthy replicas of the role", role_labels, registry=r
        )
        self.role_replicas = Gauge(f"{PREFIX}_role_replicas", "Replicas of the role", role_labels, registry=r)
        self.role_min_ready = Gauge(
            f"{PREFIX}_role_min_ready", "Healthy replicas the role needs", role_labels, registry=r
        )
        self.gpu_healthy = Gauge(
            f"{PREFIX}_gpu_healthy",
            "1 while the GPU is in service, 0 once a fatal fault quarantined it",
            ("deployment", "gpu", "uuid"),
            registry=r,
        )
        self.gpu_faults = Counter(
            f"{PREFIX}_gpu_faults",
            "GPU faults seen, by class: fatal (GPU quarantined), app (process crashed), info",
            ("deployment", "gpu", "uuid", "class"),
            registry=r,
        )


class SupervisorMetrics:
    """Observer + service: keeps the registry in step with the runner and serves it."""

    def __init__(self, plan: Plan, timeline: Timeline) -> None:
        self.plan, self.timeline = plan, timeline
        self.port: int | None = None
        self._made: _Series | None = None
        self._gpu_faults_seen: dict[tuple[str, str, str], int] = {}
        self._source: _Source | None = None
        self._restarts_seen: dict[str, int] = {}
        self._probe_seen: dict[str, object] = {}
        self._labels: dict[str, tuple[str, str, str]] = {}
        self._targets_text: str | None = None

    @property
    def series(self) -> _Series:
        if self._made is None:
            self._made = _Series()
        return self._made

    @property
    def registry(self) -> CollectorRegistry:
        return self.series.registry

    # ---- keeping the registry current -------------------------------------------------------

    def __call__(self, event: RunnerEvent) -> None:
        """Observer: refresh on every state change (and rewrite the targets file if it changed)."""
        if self._source is not None:
            self.refresh(self._source.status(), self._source.plan)

    def refresh(self, status: DeploymentStatus, plan: Plan) -> None:
        dep, m = status.name, self.series
        current: dict[str, tuple[str, str, str]] = {}
        for proc in status.processes:
            labels = current[proc.name] = (dep, proc.name, proc.role)
            word = proc.state.summary
            m.up.labels(*labels).set(1 if proc.state is ProcessState.RUNNING else 0)
            for state in PROCESS_STATES:
                m.state.labels(*labels, state).set(1 if state == word else 0)
            seen = self._restarts_seen.get(proc.name, 0)
            m.restarts.labels(*labels).inc(max(0, proc.restarts - seen))
            self._restarts_seen[proc.name] = max(seen, proc.restarts)
            if proc.last_exit is not None:
                info = proc.last_exit
                m.last_exit.labels(*labels).set(
                    128 + info.signal if info.signal is not None else info.returncode or 0
                )
            if proc.started_wall is not None:
                m.start_time.labels(*labels).set(proc.started_wall)
            probe = proc.last_probe
            if probe is not None and self._probe_seen.get(proc.name) is not probe:
                self._probe_seen[proc.name] = probe
                m.probe.labels(*labels).observe(probe.latency_s)
        for name, labels in self._labels.items():
            if name not in current:  # a reload removed it: its series go too
                for metric in (m.up, m.restarts, m.last_exit, m.start_time, m.probe):
                    with contextlib.suppress(KeyError):
                        metric.remove(*labels)
                for state in PROCESS_STATES:
                    with contextlib.suppress(KeyError):
                        m.state.remove(*labels, state)
                self._restarts_seen.pop(name, None)
        self._labels = current
        for role in roles_view(status, plan):  # a reload may add roles; removed ones keep their last value
            m.role_healthy.labels(dep, role["role"]).set(role["healthy"])
            m.role_replicas.labels(dep, role["role"]).set(role["replicas"])
            m.role_min_ready.labels(dep, role["role"]).set(role["min_ready"])
        for state in DEPLOYMENT_STATES:
            m.deployment_state.labels(dep, state).set(1 if state == status.state.value else 0)
        if self.timeline.time_to_ready_s is not None:
            m.time_to_ready.labels(dep).set(self.timeline.time_to_ready_s)
        for gpu in status.gpus:
            labels = (dep, str(gpu.index), gpu.uuid)
            m.gpu_healthy.labels(*labels).set(1 if gpu.healthy else 0)
            for cls in ("fatal", "app", "info"):
                key = (labels[1], labels[2], cls)
                count, seen = gpu.faults.get(cls, 0), self._gpu_faults_seen.get(key, 0)
                m.gpu_faults.labels(*labels, cls).inc(max(0, count - seen))
                self._gpu_faults_seen[key] = max(seen, count)
        self._write_targets(plan)

    def _write_targets(self, plan: Plan) -> None:
        text = json.dumps(targets(plan), indent=2) + "\n"
        if text == self._targets_text:
            return
        try:
            write_atomically(plan.deployment.targets_file, text)
            self._targets_text = text
        except OSError as exc:  # a metrics file must never stop supervision
            log.error(
                "cannot write the Prometheus targets file",
                path=plan.deployment.targets_file,
                error=exc.strerror or str(exc),
            )

    # ---- the service ---------------------------------------------------------------------------

    async def serve(self, runner: _Source) -> None:
        """Serve the endpoint (if a port is set), sample probe results, clean up at shutdown."""
        self._source = runner
        dep = self.plan.deployment
        server = None
        try:
            self.refresh(runner.status(), runner.plan)
            if dep.metrics_port is not None:
                try:
                    from prometheus_client import start_http_server

                    server, _thread = start_http_server(
                        dep.metrics_port, addr=dep.metrics_host, registry=self.registry
                    )
                    self.port = server.server_port
                    log.info(
                        "metrics endpoint listening",
                        url=f"http://{client_host(dep.metrics_host)}:{self.port}/metrics",
                    )
                except OSError as exc:
                    log.error(
                        "metrics endpoint not served; supervision continues",
                        host=dep.metrics_host,
                        port=dep.metrics_port,
                        error=exc.strerror or str(exc),
                    )
            while True:
                await anyio.sleep(SAMPLE_S)
                self.refresh(runner.status(), runner.plan)
        finally:
            self._source = None
            if server is not None:
                server.shutdown()
                server.server_close()
            with contextlib.suppress(OSError):
                os.unlink(runner.plan.deployment.targets_file)
