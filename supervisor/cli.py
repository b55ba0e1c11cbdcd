"""The command line: the only module that prints or exits.

Every command turns a :class:`~supervisor.errors.SupervisorError` into one line on stderr and its
exit code (2 bad input, 3 preflight failed, 1 runtime failure); nothing else reaches the user as a
traceback unless ``LMCACHE_SUPERVISE_DEBUG=1``.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from supervisor.errors import EXIT_BAD_INPUT, EXIT_RUNTIME, SupervisorError
from supervisor.spec import Plan

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int) -> None:
    """Print one line to stderr and exit with ``code``."""
    click.echo(f"lmcache-supervise: {message}", err=True)
    sys.exit(code)


def handles_errors(func: F) -> F:
    """Map supervisor errors (and a few OS ones) to one line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SupervisorError as exc:
            if os.environ.get("LMCACHE_SUPERVISE_DEBUG") == "1":
                raise
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except OSError as exc:
            if os.environ.get("LMCACHE_SUPERVISE_DEBUG") == "1":
                raise
            fail(f"{exc.filename or 'system'}: {exc.strerror or exc}", EXIT_RUNTIME)

    return wrapper  # type: ignore[return-value]


class _Group(click.Group):
    """A group whose usage errors exit 2 with one line, like every other bad input."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("standalone_mode", True)
        return super().main(*args, **kwargs)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lmcache-supervise")
def main() -> None:
    """Supervise Dynamo + vLLM + LMCache deployments: plan, check, up, and control them."""


# Commands are registered below, one block per command family. Keep presentation here and the
# work in the modules they call.


def profile_options(func: F) -> F:
    """PROFILE plus the overrides every profile-taking command accepts."""
    func = click.option("--model", "model", default=None, help="Override model.name (HF id or local path).")(func)
    func = click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help="Override a profile key, e.g. --set ports.base=9000 (repeatable; values are TOML).",
    )(func)
    return click.argument("profile")(func)  # type: ignore[return-value]


def node_options(func: F) -> F:
    """``--role/--head/--advertise``: which part of PROFILE this machine runs (README, "Several machines")."""
    func = click.option(
        "--advertise", default=None, metavar="ADDR",
        help="This machine's address as the other nodes reach it (default: ports.host when it is a concrete "
             "address; on a worker node, the address this host uses toward --head).",
    )(func)
    func = click.option("--head", default=None, metavar="HOST",
                        help="The head node's address (required with --role worker).")(func)
    return click.option(  # type: ignore[return-value]
        "--role", default="all", show_default=True, metavar="all|head|worker",
        help="head: etcd/NATS, the frontend and workers with node = \"head\"; worker: the other workers, "
             "pointed at --head; all: everything on this machine.",
    )(func)


def load_plan(profile: str, overrides: tuple[str, ...] = (), model: str | None = None, *, role: str = "all",
              head: str | None = None, advertise: str | None = None) -> Plan:
    """Profile name or path -> validated profile -> plan (state under the state root) for this node's role."""
    from supervisor import nodes, paths, plan, profile as profiles

    loaded = profiles.load(profile, overrides=overrides, model=model)
    options = nodes.node_options(loaded, role, head=head, advertise=advertise)  # type: ignore[arg-type]
    return plan.render(loaded, state_root=paths.state_root(), **options.as_kwargs())  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ plan


@main.command("plan")
@profile_options
@node_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@handles_errors
def plan_command(profile: str, overrides: tuple[str, ...], model: str | None, role: str, head: str | None,
                 advertise: str | None, as_json: bool) -> None:
    """Show what PROFILE would start, in order, without starting anything."""
    import json

    from supervisor.views import plan_view, print_plan_table

    rendered = load_plan(profile, overrides, model, role=role, head=head, advertise=advertise)
    if as_json:
        click.echo(json.dumps(plan_view(rendered), indent=2, sort_keys=False))
    else:
        print_plan_table(rendered)


# ----------------------------------------------------------------------------------------- check

# The check names, spelled out so the CLI needs no import of preflight (and psutil) to build --help;
# tests/test_preflight.py asserts they equal preflight.CHECKS.
CHECK_NAMES = ("arch", "gpu", "lmcache-config", "host-memory", "disk", "ports", "remote-cache", "software",
               "model", "discovery")


def skip_check_option(func: F) -> F:
    """``--skip-check NAME`` (repeatable), shared by ``check`` and ``up``."""
    return click.option(  # type: ignore[return-value]
        "--skip-check", "skip", multiple=True, type=click.Choice(CHECK_NAMES), metavar="NAME",
        help="Turn this check's failures into warnings (repeatable): " + ", ".join(CHECK_NAMES) + ".",
    )(func)


def run_preflight(rendered: Plan, skip: tuple[str, ...] = ()) -> list[Any]:
    """Probe the host for what ``rendered`` needs and judge it: the findings ``check`` shows.

    ``up`` calls this, prints with :func:`print_findings`, then ``preflight.enforce(findings)``."""
    from supervisor import host, preflight

    # The LMCache config files first: the remote URL or disk cache they name are probed too.
    files = host.read_lmcache_files(preflight.lmcache_file_requests(rendered))
    return preflight.check(rendered, host.gather(preflight.facts_request(rendered, files)), skip=skip)


def print_findings(findings: list[Any]) -> None:
    """A table readable at a glance: status colored, then check, message and fix hint."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    style = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    table = Table(show_lines=False, header_style="bold", expand=False)
    for column in ("status", "check", "message", "hint"):
        table.add_column(column, overflow="fold")
    for f in findings:
        status = f.status.value
        table.add_row(f"[{style[status]}]{status.upper()}[/]", f.check, escape(f.message),
                      f"[dim]{escape(f.hint)}[/]")
    counts = {s: sum(f.status.value == s for f in findings) for s in style}
    console = Console()
    console.print(table)
    console.print(f"{counts['fail']} failed, {counts['warn']} warning(s), {counts['ok']} ok")


@main.command("check")
@profile_options
@node_options
@skip_check_option
@click.option("--json", "as_json", is_flag=True,
              help='Print a JSON list of {"check", "status", "message", "hint"} instead of a table.')
@handles_errors
def check_command(profile: str, overrides: tuple[str, ...], model: str | None, role: str, head: str | None,
                  advertise: str | None, skip: tuple[str, ...], as_json: bool) -> None:
    """Check that this host can run PROFILE: exit 0 when ok or only warnings, 3 on any failure."""
    import json

    from supervisor.preflight import Status, enforce

    findings = run_preflight(load_plan(profile, overrides, model, role=role, head=head, advertise=advertise), skip)
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
@click.option("--quiet-children", is_flag=True,
              help="Do not copy child output to the terminal (it still goes to the log files).")
@handles_errors
def up_command(profile: str, overrides: tuple[str, ...], model: str | None, role: str, head: str | None,
               advertise: str | None, skip: tuple[str, ...], quiet_children: bool) -> None:
    """Start PROFILE in the foreground and supervise it; Ctrl-C or SIGTERM stops it in order.

    Exits 0 after an orderly shutdown and 1 when a required process failed for good (crash loop),
    so that systemd can take over."""
    import time

    from supervisor import cli_control, foreground, logs, notify, reload
    from supervisor.preflight import Status, enforce
    from supervisor.states import DeploymentEvent, DeploymentState, RunnerEvent

    started = time.monotonic()
    # First: read NOTIFY_SOCKET/WATCHDOG_* and drop them from our environment before anything
    # (preflight's probes included) is spawned. Without systemd this is a no-op.
    bridge = notify.SystemdBridge(notify.Notifier.from_env())
    rendered = load_plan(profile, overrides, model, role=role, head=head, advertise=advertise)
    findings = run_preflight(rendered, skip)
    if any(f.status is not Status.OK for f in findings):
        print_findings(findings)
    enforce(findings)
    logs.configure()
    dep = rendered.deployment
    announced: list[bool] = []

    def announce(event: RunnerEvent) -> None:
        if isinstance(event, DeploymentEvent) and event.new is DeploymentState.READY and not announced:
            announced.append(True)
            click.echo(f"ready: OpenAI API at {dep.base_url}/v1 (model {dep.served_model_name}) "
                       f"in {time.monotonic() - started:.1f} s")

    def reread() -> Plan:  # SIGHUP / `reload`: the same profile with the same flags, read again
        return load_plan(profile, overrides, model, role=role, head=head, advertise=advertise)

    reloader = reload.Reloader(reread, on_begin=bridge.begin_reload, on_end=bridge.end_reload)
    echo = None if quiet_children else logs.TerminalEcho()
    observers, services = cli_control.observability(rendered)  # control socket, metrics, progress
    try:
        code = foreground.run(rendered, observers=[announce, bridge, *observers], services=[bridge.serve, *services],
                          reload=reloader, echo=echo)
    finally:
        if echo is not None:
            echo.close()
    sys.exit(code)


@main.command("down")
@click.argument("deployment", required=False)
@click.option("--deployment", "-d", "named", default=None, metavar="NAME", help="Same as DEPLOYMENT.")
@click.option("--timeout", "timeout_s", type=float, default=120.0, show_default=True,
              help="Seconds to wait for the supervisor to finish its orderly shutdown.")
@handles_errors
def down_command(deployment: str | None, named: str | None, timeout_s: float) -> None:
    """Stop a running deployment (the only one running when DEPLOYMENT is not given), over its control socket."""
    from supervisor import cli_control

    cli_control.down(named or deployment, timeout_s)


# ---------------------------------------------------------------------------------------- reload


@main.command("reload")
@click.argument("deployment", required=False)
@click.option("--timeout", "timeout_s", type=float, default=1800.0, show_default=True,
              help="Seconds to wait for the restarted processes to be ready again.")
@handles_errors
def reload_command(deployment: str | None, timeout_s: float) -> None:
    """Re-read a running deployment's profile; restart only the processes whose plan changed.

    A profile that no longer validates is refused (exit 2) and every process keeps running."""
    from supervisor import paths, pidfile, reload

    entry = pidfile.choose(paths.state_root(), deployment)
    outcome = reload.request(entry.pid_file.parent, entry.pid, timeout_s=timeout_s)
    if not outcome.ok:
        fail(f"reload of {entry.deployment} refused, every process keeps running: {outcome.message}",
             EXIT_BAD_INPUT)
    click.echo(f"reloaded {entry.deployment}: {outcome.message}")


# Commands that talk to a running deployment (status, restart, stop, start, logs, metrics, smoke) live in
# cli_control.py, and those that write the deployment out for another system (systemd units, Kubernetes
# manifests) in cli_deploy.py; importing them registers them on ``main``.
from supervisor import cli_control as _cli_control  # noqa: E402,F401
from supervisor import cli_deploy as _cli_deploy  # noqa: E402,F401
