"""The pipeline's commands: plan, check, up, down and reload.

``plan`` stops after render, ``check`` after preflight, ``up`` runs the plan; presentation and exit
codes only, the work is in :mod:`supervisor.api`.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from supervisor.cli.app import (
    deployment_arguments,
    fail,
    handles_errors,
    load_plan,
    main,
    node_options,
    print_findings,
    profile_options,
    run_preflight,
    skip_check_option,
)
from supervisor.errors import EXIT_BAD_INPUT, EXIT_RUNTIME
from supervisor.plan.spec import Plan

# ------------------------------------------------------------------------------------------ plan


@main.command("plan")
@profile_options
@node_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@handles_errors
def plan_command(
    profile: str,
    overrides: tuple[str, ...],
    model: str | None,
    role: str,
    head: str | None,
    advertise: str | None,
    as_json: bool,
) -> None:
    """Show what PROFILE would start, in order, without starting anything."""
    import json

    from supervisor.cli.views import plan_view, print_plan_table

    rendered = load_plan(profile, overrides, model, role=role, head=head, advertise=advertise)
    if as_json:
        click.echo(json.dumps(plan_view(rendered), indent=2, sort_keys=False))
    else:
        print_plan_table(rendered)


# ----------------------------------------------------------------------------------------- check


@main.command("check")
@profile_options
@node_options
@skip_check_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print a JSON list of {"check", "status", "message", "hint"} instead of a table.',
)
@click.option(
    "--fresh",
    is_flag=True,
    help="Probe the worker interpreter again instead of trusting the cached answer (kept while nothing "
    "is installed or removed there).",
)
@handles_errors
def check_command(
    profile: str,
    overrides: tuple[str, ...],
    model: str | None,
    role: str,
    head: str | None,
    advertise: str | None,
    skip: tuple[str, ...],
    as_json: bool,
    fresh: bool,
) -> None:
    """Check that this host can run PROFILE: exit 0 when ok or only warnings, 3 on any failure."""
    import json

    from supervisor.preflight.checks import Status, enforce

    findings = run_preflight(
        load_plan(profile, overrides, model, role=role, head=head, advertise=advertise), skip, fresh=fresh
    )
    if as_json:
        click.echo(json.dumps([f.to_json() for f in findings], indent=2))
    else:
        print_findings(findings)
    if any(f.status is Status.FAIL for f in findings):
        enforce(findings)  # raises PreflightError: one line on stderr, exit 3


# -------------------------------------------------------------------------------------- up, down


@main.command("up")
@profile_options
@node_options
@skip_check_option
@click.option(
    "--logs",
    "-f",
    "follow",
    is_flag=True,
    help="Interleave the children's output here instead of the panel, each line prefixed with its process "
    "name (it always goes to their log files: `logs -f NAME` follows one from another terminal).",
)
@click.option(
    "--quiet-children", is_flag=True, hidden=True
)  # the old opt-out: children are quiet by default now
@handles_errors
def up_command(
    profile: str,
    overrides: tuple[str, ...],
    model: str | None,
    role: str,
    head: str | None,
    advertise: str | None,
    skip: tuple[str, ...],
    follow: bool,
    quiet_children: bool,
) -> None:
    """Start PROFILE in the foreground and supervise it; Ctrl-C or SIGTERM stops it in order.

    On a terminal: a live panel of the processes, each event once above it, one ready line. Without
    one (systemd, a pipe): JSON events on stderr, one per line, and the ready line alone on stdout.
    Exits 0 after an orderly shutdown and 1 when a required process failed for good (crash loop),
    so that systemd can take over."""
    from supervisor import api
    from supervisor.control.progress import Timeline
    from supervisor.engine import logs
    from supervisor.preflight.checks import Status

    # First: read NOTIFY_SOCKET/WATCHDOG_* and drop them from our environment before anything
    # (preflight's probes included) is spawned. Without systemd this is a no-op.
    bridge = api.systemd_bridge()
    rendered = load_plan(profile, overrides, model, role=role, head=head, advertise=advertise)
    findings = run_preflight(rendered, skip)
    if any(f.status is not Status.OK for f in findings):
        print_findings(findings)
    api.enforce(findings)

    def reread() -> Plan:  # SIGHUP / `reload`: the same profile with the same flags, read again
        return load_plan(profile, overrides, model, role=role, head=head, advertise=advertise)

    timeline = Timeline()  # the one clock of every line below: seconds since supervision began
    dep = rendered.deployment

    def ready_text(elapsed_s: float) -> str:
        return f"ready: OpenAI API at {dep.base_url}/v1 (model {dep.served_model_name}) in {elapsed_s:.1f} s"

    terminal = sys.stdout.isatty()
    echo = logs.TerminalEcho(color=terminal) if follow else None
    try:
        if terminal:
            code = _up_on_terminal(rendered, timeline, ready_text, reread, bridge, echo)
        else:
            code = api.up(
                rendered,
                reread=reread,
                observers=[_ReadyLine(ready_text, timeline)],
                echo=echo,
                systemd=bridge,
                timeline=timeline,
            )
    finally:
        if echo is not None:
            echo.close()
    sys.exit(code)


class _ReadyLine:
    """Without a terminal: the ready line alone on stdout, once, on the start-up clock (the events are
    JSON lines on stderr)."""

    def __init__(self, text: Any, timeline: Any) -> None:
        self.text, self.timeline, self.said = text, timeline, False

    def __call__(self, event: Any) -> None:
        from supervisor.engine.states import DeploymentEvent, DeploymentState

        if isinstance(event, DeploymentEvent) and event.new is DeploymentState.READY and not self.said:
            self.said = True
            click.echo(self.text(self.timeline.elapsed_s()))


def _up_on_terminal(
    rendered: Plan, timeline: Any, ready_text: Any, reread: Any, bridge: Any, echo: Any
) -> int:
    """The live panel (supervisor.cli.live): the status table refreshed in place, events once above it;
    with ``--logs`` (``echo``) the events and the children's lines scroll, without a panel."""
    from rich.console import Console

    from supervisor import api
    from supervisor.cli.live import TerminalUp
    from supervisor.cli.status import render_status
    from supervisor.control.status import status_view

    view = TerminalUp(
        console=Console(highlight=False),
        ready_text=ready_text,
        elapsed=timeline.elapsed_s,
        document=lambda status: status_view(status, rendered, timeline),
        render=render_status,
        panel=echo is None,
    )
    with view:
        return api.up(
            rendered,
            reread=reread,
            observers=[view],
            services=[view.serve],
            echo=echo,
            systemd=bridge,
            timeline=timeline,
            events=view.event,
            hangup="stop",  # the terminal went away: stop in order, as any foreground program does
        )


@main.command("down")
@deployment_arguments
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the supervisor to finish its orderly shutdown.",
)
@handles_errors
def down_command(deployment: str | None, timeout_s: float) -> None:
    """Stop a running deployment (the only one running when none is named), over its control socket."""
    from supervisor.cli import control as cli_control

    cli_control.down(deployment, timeout_s)


# ---------------------------------------------------------------------------------------- reload


@main.command("reload")
@deployment_arguments
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=1800.0,
    show_default=True,
    help="Seconds to wait for the restarted processes to be ready again.",
)
@handles_errors
def reload_command(deployment: str | None, timeout_s: float) -> None:
    """Re-read a running deployment's profile (the only one running when none is named); restart only
    the processes whose plan changed: worker replicas one at a time (never below their role's
    min_ready), the others at once.

    A profile that no longer validates is refused (exit 2) and every process keeps running."""
    from supervisor.cli.control import find_deployment
    from supervisor.control import reload

    entry = find_deployment(deployment)
    outcome = reload.request(entry, timeout_s=timeout_s)
    if not outcome.ok and outcome.applied:
        fail(f"reload of {entry.deployment} applied its new plan, but {outcome.message}", EXIT_RUNTIME)
    if not outcome.ok:
        fail(
            f"reload of {entry.deployment} refused, every process keeps running: {outcome.message}",
            EXIT_BAD_INPUT,
        )
    click.echo(f"reloaded {entry.deployment}: {outcome.message}")
