"""The Python API: the pipeline's stages as functions, for the CLI, the bench, the soak, the GPU run and tests.

::

    import supervisor

    profile = supervisor.load("disagg", overrides=["ports.base=9000"])  # validated intent
    plan = supervisor.render(profile)                                   # pure: same profile, same plan
    findings = supervisor.check(plan)                                   # probes the host, judges purely
    supervisor.enforce(findings)                                        # PreflightError (exit 3) on a failure
    code = supervisor.up(plan)                                          # blocks until stopped

Every function raises a :class:`~supervisor.errors.SupervisorError` subclass on bad input or a failed
stage; only :mod:`supervisor.cli` turns those into a line on stderr and an exit code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from supervisor.control.notify import SystemdBridge
    from supervisor.control.progress import Timeline
    from supervisor.engine.logs import TerminalEcho
    from supervisor.engine.runner import Observer, Service
    from supervisor.plan.infra import NodeRole
    from supervisor.plan.nodes import NodeOptions
    from supervisor.plan.spec import Plan
    from supervisor.preflight.findings import Finding
    from supervisor.profile.schema import Profile


def load(profile: str, *, overrides: Sequence[str] = (), model: str | None = None) -> Profile:
    """A built-in profile name or a TOML path, with ``--set`` style overrides, validated."""
    from supervisor.profile import load as profiles

    return profiles.load(profile, overrides=tuple(overrides), model=model)


def render(
    profile: Profile, *, role: NodeRole = "all", head: str | None = None, advertise: str | None = None
) -> Plan:
    """The plan for this machine's part of ``profile`` (state under the state root); no IO but the env."""
    from supervisor.plan import nodes

    return _render(profile, nodes.node_options(profile, role, head=head, advertise=advertise))


def _render(profile: Profile, options: NodeOptions) -> Plan:
    from supervisor import paths
    from supervisor.plan import render as rendering

    return rendering.render(profile, state_root=paths.state_root(), **options.as_kwargs())  # type: ignore[arg-type]


def load_plan(
    profile: str,
    *,
    overrides: Sequence[str] = (),
    model: str | None = None,
    role: NodeRole = "all",
    head: str | None = None,
    advertise: str | None = None,
) -> Plan:
    """:func:`load` then :func:`render`; a single-node plan comes from the plan cache while nothing
    it was made from changed (``host.plancache``: what is watched, and why)."""
    from supervisor.host.plancache import PlanCache

    single = role == "all" and head is None and advertise is None
    cache = PlanCache.for_profile(profile, overrides, model) if single else None
    if cache is not None and (plan := cache.get()) is not None:
        return plan
    from supervisor.plan import nodes

    loaded = load(profile, overrides=overrides, model=model)
    options = nodes.node_options(loaded, role, head=head, advertise=advertise)
    plan = _render(loaded, options)
    if cache is not None:
        search_path = nodes.binary_search_path(loaded)
        cache.put(plan, search_path=search_path, binaries=options.binaries.values())
    return plan


def check(plan: Plan, *, skip: Iterable[str] = (), fresh: bool = False) -> list[Finding]:
    """Probe the host for what ``plan`` needs (only that) and judge it: every finding, failures included.

    ``fresh`` probes the worker interpreter again instead of taking its cached facts."""
    import dataclasses

    from supervisor.host import facts
    from supervisor.preflight import checks

    # The LMCache config files first: the remote URL or disk cache they name are probed too.
    files = facts.read_lmcache_files(checks.lmcache_file_requests(plan))
    request = checks.facts_request(plan, files)
    if fresh:
        request = dataclasses.replace(request, cached=False)
    return checks.check(plan, facts.gather(request), skip=tuple(skip))


def enforce(findings: Sequence[Finding]) -> None:
    """Raise :class:`~supervisor.errors.PreflightError` (exit 3) naming the failed checks, if any."""
    from supervisor.preflight.checks import enforce as enforce_findings

    enforce_findings(list(findings))


def up(
    plan: Plan,
    *,
    reread: Callable[[], Plan] | None = None,
    observers: Iterable[Observer] = (),
    services: Iterable[Service] = (),
    echo: TerminalEcho | None = None,
    progress_sink: Callable[[str], None] | None = None,
    systemd: SystemdBridge | None = None,
    timeline: Timeline | None = None,
    events: Callable[[dict[str, Any]], None] | None = None,
    hangup: Literal["reload", "stop"] = "reload",
) -> int:
    """Supervise ``plan`` in the foreground until SIGINT/SIGTERM (or a failure); returns the exit code.

    Beside the processes it runs what a deployment needs: the control socket, the metrics endpoint
    and targets file, start-up progress (to ``progress_sink``, else log events), sd_notify (``systemd``:
    create it with :func:`systemd_bridge` before anything is spawned) and reloads on SIGHUP or
    ``reload`` (``reread`` returns the new plan; without it a reload is refused). 0 after an orderly
    stop, 1 when a required process failed for good. ``timeline`` is the one clock of start-up (pass
    your own to read it as well); ``events`` takes every supervisor event instead of stderr (JSON lines).
    ``hangup="stop"`` (on a terminal): SIGHUP stops the deployment as SIGTERM does; ``reload``
    still reloads over the control socket.
    """
    from supervisor import eventlog
    from supervisor.control import metrics, progress, reload
    from supervisor.engine import foreground
    from supervisor.engine.gpuguard import GpuGuard

    eventlog.configure(sink=events)
    bridge = systemd or systemd_bridge()
    timeline = timeline or progress.Timeline()
    stages = progress.Progress(timeline, sink=progress_sink)
    exported = metrics.SupervisorMetrics(plan, timeline)
    reloader = None
    if reread is not None:
        reloader = reload.Reloader(reread, on_begin=bridge.begin_reload, on_end=bridge.end_reload)
    return foreground.run(
        plan,
        observers=[*observers, bridge, timeline, stages, exported],
        services=[
            bridge.serve,
            _control_service(plan, timeline),
            exported.serve,
            stages.serve,
            GpuGuard(plan).serve,  # GPU faults: quarantine, move to a spare (nothing without GPUs)
            *services,
        ],
        reload=reloader,
        echo=echo,
        hangup=hangup,
    )


def _control_service(plan: Plan, timeline: Timeline) -> Service:
    """The control socket, imported when its service starts: after the first spawn (the server's
    module brings httpx, psutil views and the hints: a tenth of a second of start-up on a busy host)."""

    async def serve(runner: Any) -> None:
        from supervisor.control import server as control

        await control.ControlServer(plan, timeline).serve(runner)

    return serve


def systemd_bridge() -> SystemdBridge:
    """Read ``NOTIFY_SOCKET``/``WATCHDOG_*`` and drop them from this process's environment, so no child
    (a preflight probe included) inherits them. Without systemd the bridge does nothing."""
    from supervisor.control import notify

    return notify.SystemdBridge(notify.Notifier.from_env())
