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
from typing import Any, NoReturn, TypeVar

import click

from supervisor.errors import EXIT_RUNTIME, SupervisorError
from supervisor.plan.spec import Plan
from supervisor.redact import redact_text

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int) -> NoReturn:
    """Print one line to stderr and exit with ``code``."""
    click.echo(f"lmcache-supervise: {redact_text(message)}", err=True)  # last line of defence
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


# Commands live in their own modules (pipeline, control, deploy); ``supervisor.cli`` imports them,
# which registers them on ``main``. This module imports none of them.


def profile_options(func: F) -> F:
    """PROFILE plus the overrides every profile-taking command accepts."""
    func = click.option("--model", "model", default=None, help="Override model.name (HF id or local path).")(
        func
    )
    func = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a profile key, e.g. --set ports.base=9000 (repeatable; values are TOML).",
    )(func)
    return click.argument("profile")(func)


def node_options(func: F) -> F:
    """``--role/--head/--advertise``: which part of PROFILE this machine runs (README, "Several machines")."""
    func = click.option(
        "--advertise",
        default=None,
        metavar="ADDR",
        help="This machine's address as the other nodes reach it (default: ports.host when it is a concrete "
        "address; on a worker node, the address this host uses toward --head).",
    )(func)
    func = click.option(
        "--head", default=None, metavar="HOST", help="The head node's address (required with --role worker)."
    )(func)
    return click.option(
        "--role",
        default="all",
        show_default=True,
        metavar="all|head|worker",
        help='head: etcd/NATS, the frontend and workers with node = "head"; worker: the other workers, '
        "pointed at --head; all: everything on this machine.",
    )(func)


def deployment_arguments(func: F) -> F:
    """``[DEPLOYMENT]`` and ``-d/--deployment NAME``: the two ways ``down`` and ``reload`` take a name.

    Every command that talks to a running deployment takes ``-d``; these two also kept the positional
    form they had first. The command receives one ``deployment`` (None: the only one running)."""

    @functools.wraps(func)
    def wrapper(*args: Any, positional: str | None, named: str | None, **kwargs: Any) -> Any:
        if positional and named and positional != named:
            raise click.UsageError(f"two deployments named: {positional!r} and -d {named!r}; give one")
        return func(*args, deployment=named or positional, **kwargs)

    wrapper = click.option(
        "--deployment",
        "-d",
        "named",
        default=None,
        metavar="NAME",
        help="Which running deployment (needed only when several run under the state root).",
    )(wrapper)
    return click.argument("positional", metavar="[DEPLOYMENT]", required=False)(wrapper)  # type: ignore[return-value]


def load_plan(
    profile: str,
    overrides: tuple[str, ...] = (),
    model: str | None = None,
    *,
    role: str = "all",
    head: str | None = None,
    advertise: str | None = None,
) -> Plan:
    """Profile name or path -> validated profile -> plan (state under the state root) for this node's role."""
    from supervisor import api

    return api.load_plan(profile, overrides=overrides, model=model, role=role, head=head, advertise=advertise)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ preflight helpers

# The check names, spelled out so the CLI needs no import of preflight (and psutil) to build --help;
# tests/preflight/test_preflight.py asserts they equal preflight.CHECKS.
CHECK_NAMES = (
    "arch",
    "gpu",
    "gpu-health",
    "lmcache-config",
    "host-memory",
    "disk",
    "ports",
    "remote-cache",
    "memlock",
    "shm",
    "software",
    "engine",
    "model",
    "discovery",
    "transport",
)


def skip_check_option(func: F) -> F:
    """``--skip-check NAME`` (repeatable), shared by ``check`` and ``up``."""
    return click.option(
        "--skip-check",
        "skip",
        multiple=True,
        type=click.Choice(CHECK_NAMES),
        metavar="NAME",
        help="Turn this check's failures into warnings (repeatable): " + ", ".join(CHECK_NAMES) + ".",
    )(func)


def run_preflight(rendered: Plan, skip: tuple[str, ...] = (), *, fresh: bool = False) -> list[Any]:
    """Probe the host for what ``rendered`` needs and judge it: the findings ``check`` shows.

    ``up`` calls this, prints with :func:`print_findings`, then ``api.enforce(findings)``."""
    from supervisor import api

    return api.check(rendered, skip=skip, fresh=fresh)


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
        table.add_row(
            f"[{style[status]}]{status.upper()}[/]", f.check, escape(f.message), f"[dim]{escape(f.hint)}[/]"
        )
    counts = {s: sum(f.status.value == s for f in findings) for s in style}
    console = Console()
    console.print(table)
    console.print(f"{counts['fail']} failed, {counts['warn']} warning(s), {counts['ok']} ok")
