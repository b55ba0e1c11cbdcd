"""Run a :class:`~supervisor.engine.runner.Runner` in the foreground: signals, the pid file, services, reloads.

The runner knows nothing of the process it lives in; this module owns what belongs to that process:
signal handlers that only enqueue (anyio's receiver), the pid file ``down`` and ``reload`` find it
by, the services that run beside the runner (sd_notify's watchdog, the control socket, metrics) and
the one-at-a-time reload queue.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal

import anyio

from supervisor.engine import reaper
from supervisor.engine.logs import LogOptions, TerminalEcho
from supervisor.engine.pidfile import PidFile
from supervisor.engine.runner import Observer, Runner, Service
from supervisor.eventlog import log
from supervisor.host import credentials
from supervisor.plan.spec import Plan


def run(
    plan: Plan,
    *,
    observers: Iterable[Observer] = (),
    services: Iterable[Service] = (),
    reload: Callable[[Runner], Awaitable[object]] | None = None,
    log_options: LogOptions = LogOptions(),
    echo: TerminalEcho | None = None,
    hangup: Literal["reload", "stop"] = "reload",
) -> int:
    """Supervise ``plan`` in the foreground until SIGINT/SIGTERM; returns the exit code.

    Signal handlers only enqueue (anyio's receiver); the first SIGINT/SIGTERM starts the orderly
    shutdown, a second one SIGKILLs every group. The pid file is held throughout. ``services`` run
    in the event loop beside the runner (sd_notify's watchdog); ``reload`` runs once per request
    (:meth:`Runner.request_reload`, or SIGHUP), one at a time, requests arriving meanwhile folded
    into one more. ``hangup="stop"`` (on a terminal): SIGHUP is the terminal going away, and starts
    the orderly shutdown as SIGTERM does; the ``reload`` command still reaches the runner.
    """

    async def main() -> int:
        # As a container's PID 1 orphans come to us anyway; elsewhere this keeps our tree's orphans
        # under us (not the host's init): either way they are reaped here.
        if not reaper.become_subreaper():
            log.warning("could not become a child subreaper; orphans of the tree go to init")
        runner = Runner(plan, log_options=log_options, echo=echo)
        for observer in observers:
            runner.subscribe(observer)
        with (
            PidFile(plan.deployment.state_dir, plan.deployment.name),
            anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals,
        ):
            credentials.prepare(plan)  # in the 0700 state directory, before etcd/nats or a worker starts
            async with anyio.create_task_group() as tg:
                reloads, reload_requests = anyio.create_memory_object_stream[None](1)

                def queue_reload() -> None:
                    with contextlib.suppress(anyio.WouldBlock):  # one already queued
                        reloads.send_nowait(None)

                if reload is not None:
                    runner.reload_hook = queue_reload

                async def handle_signals() -> None:
                    count = 0
                    async for signum in signals:
                        if signum == signal.SIGHUP and hangup == "reload":
                            if reload is None:
                                log.info("SIGHUP ignored: nothing to reload")
                            else:
                                queue_reload()
                            continue
                        count += 1
                        reason = signal.Signals(signum).name
                        if signum == signal.SIGHUP:
                            reason += " (the terminal went away)"
                        runner.request_shutdown(kill=count > 1, reason=reason)

                async def reloader() -> None:
                    async for _ in reload_requests:
                        if reload is not None and not runner.shutting_down:
                            await reload(runner)

                tg.start_soon(handle_signals)
                tg.start_soon(reloader)
                tg.start_soon(reaper.reap_orphans, runner.own_children)
                for service in services:
                    tg.start_soon(_after_first_spawn, service, runner)
                code = await runner.serve()
                tg.cancel_scope.cancel()
        return code

    return anyio.run(main, backend="asyncio")


#: The longest a service waits for the first spawn (a first process may wait on its GPUs for minutes).
SERVICE_DELAY_MAX_S = 1.0


async def _after_first_spawn(service: Service, runner: Runner) -> None:
    """Start ``service`` once the runner spawned its first process: services import what they serve
    with (prometheus_client, the control server: ~40 ms) and that must not delay the first spawn.
    They are observers too, and catch up from the runner's status when they begin."""
    with contextlib.suppress(TimeoutError):
        await runner.wait_until(
            lambda status: any(p.pid is not None for p in status.processes), timeout_s=SERVICE_DELAY_MAX_S
        )
    await service(runner)
