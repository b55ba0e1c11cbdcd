"""The commands that act on a running deployment (restart, stop, start, down) and what every command
that talks to one shares: finding it, its status, a console, durations.

``status`` is in :mod:`supervisor.cli.status`; ``logs``, ``metrics`` and ``smoke`` in
:mod:`supervisor.cli.observe`. Presentation and exit codes only; the work is in
:mod:`supervisor.control`. ``supervisor.cli`` imports these modules, which registers the commands.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from supervisor.cli.app import handles_errors, main
from supervisor.errors import BadRequestError, ControlError

F = TypeVar("F", bound=Callable[..., Any])


def deployment_option(func: F) -> F:
    return click.option(
        "--deployment",
        "-d",
        "deployment",
        default=None,
        metavar="NAME",
        help="Which running deployment (needed only when several run under the state root).",
    )(func)


def find_deployment(deployment: str | None) -> Any:
    from supervisor import paths
    from supervisor.control import client as control

    return control.find(paths.state_root(), deployment)


def fetch_status(endpoint: Any) -> dict[str, Any]:
    from supervisor.control import client as control

    status: dict[str, Any] = control.request(endpoint, {"op": "status"})["status"]
    return status


def make_console() -> Any:
    """A rich console; piped output gets a wide page instead of rich's 80 columns (no truncated tables)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _act(op: str, process: str, deployment: str | None, wait_s: float) -> dict[str, Any]:
    from supervisor.control import client as control

    endpoint = find_deployment(deployment)
    return control.request(
        endpoint, {"op": op, "process": process, "wait_s": wait_s}, timeout_s=wait_s + 10.0
    )


def wait_options(func: F) -> F:
    func = click.option("--no-wait", is_flag=True, help="Answer at once instead of waiting for health.")(func)
    return click.option(
        "--timeout",
        "timeout_s",
        type=click.FloatRange(min=0.1),
        default=600.0,
        show_default=True,
        help="Seconds to wait for the process to be healthy again (and the model ready).",
    )(func)


@main.command("restart")
@click.argument("process", required=False)
@click.option("--all", "everything", is_flag=True, help="Every worker replica, one at a time.")
@click.option(
    "--allow-downtime",
    is_flag=True,
    help="Restart even when that leaves a role with fewer healthy replicas than its min_ready "
    "(a role with one replica, the frontend).",
)
@deployment_option
@wait_options
@handles_errors
def restart_command(
    process: str | None,
    everything: bool,
    allow_downtime: bool,
    deployment: str | None,
    timeout_s: float,
    no_wait: bool,
) -> None:
    """Restart PROCESS, or every replica of the role PROCESS one at a time, or (--all) every worker.

    Each replica gets one stop signal (SIGKILL of its group after its stop timeout), is started
    again, and is healthy and counted by the frontend before the next one stops; a role never drops
    below its min_ready, so a role with one replica is refused unless --allow-downtime.
    """
    if everything == (process is not None):
        raise BadRequestError("restart: name a PROCESS or a role, or pass --all (not both)")
    started = time.monotonic()
    endpoint = find_deployment(deployment)
    from supervisor.control import client as control

    wait_s = 0.0 if no_wait else timeout_s
    message = {"op": "restart", "process": process, "all": everything, "allow_downtime": allow_downtime}
    # A roll waits per replica: allow the whole of it (each step has its own timeout on the server).
    answer = control.request(endpoint, {**message, "wait_s": wait_s}, timeout_s=wait_s * 16 + 10.0)
    steps = answer.get("steps") or []
    took = f"deployment {answer['deployment_state']} ({time.monotonic() - started:.1f} s)"
    proc = answer["process"]
    if len(steps) <= 1:
        name = steps[0]["name"] if steps else process
        click.echo(
            f"restarted {name}: pid {answer['old_pid'] or '-'} -> {proc['pid'] or '-'}, {proc['state']}; {took}"
        )
        return
    for step in steps:
        click.echo(
            f"restarted {step['name']}: pid {step['old_pid'] or '-'} -> {step['new_pid'] or '-'} ({step['seconds']:.1f} s)"
        )
    click.echo(f"restarted {'every worker' if everything else process}, one at a time; {took}")


@main.command("stop")
@click.argument("process")
@deployment_option
@handles_errors
def stop_command(process: str, deployment: str | None) -> None:
    """Stop PROCESS (its process group, in order) until `start`; the deployment reports itself degraded."""
    answer = _act("stop", process, deployment, 0.0)
    click.echo(
        f"stopped {process} (was pid {answer['old_pid'] or '-'}); deployment {answer['deployment_state']}"
    )


@main.command("start")
@click.argument("process")
@deployment_option
@wait_options
@handles_errors
def start_command(process: str, deployment: str | None, timeout_s: float, no_wait: bool) -> None:
    """Start a stopped, exited or failed PROCESS and wait until it is healthy."""
    started = time.monotonic()
    answer = _act("start", process, deployment, 0.0 if no_wait else timeout_s)
    proc = answer["process"]
    verb = f"{process} was {answer['note']}" if answer.get("note") else f"started {process}"
    click.echo(
        f"{verb}: pid {proc['pid'] or '-'}, {proc['state']}; "
        f"deployment {answer['deployment_state']} ({time.monotonic() - started:.1f} s)"
    )


def down(deployment: str | None, timeout_s: float) -> None:
    """``down``: ask over the control socket, wait for the supervisor to exit; SIGTERM if it does not answer."""
    from supervisor import paths
    from supervisor.control import client as control
    from supervisor.engine import pidfile

    endpoint = find_deployment(deployment)
    try:
        control.request(endpoint, {"op": "down"})
    except BadRequestError:
        raise
    except ControlError:
        # No answer (a supervisor still in preflight, or an older one): the signal path still works.
        took = pidfile.stop(pidfile.choose(paths.state_root(), endpoint.deployment), timeout_s=timeout_s)
    else:
        took = control.wait_gone(endpoint, timeout_s=timeout_s)
    click.echo(f"stopped {endpoint.deployment} (supervisor pid {endpoint.pid}) in {took:.1f} s")
