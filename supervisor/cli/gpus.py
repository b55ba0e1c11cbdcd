"""``lmcache-supervise gpus [--json]`` and ``gpus clear N``: the watched GPUs of a running deployment.

Presentation only: the document comes from the control socket (op ``gpus``, built by
:mod:`supervisor.control.gpus` from the GPU guard's view); ``clear`` is op ``gpu-clear``.
"""

from __future__ import annotations

import json
from typing import Any

import click

from supervisor.cli.app import handles_errors, main
from supervisor.cli.control import deployment_option, find_deployment, make_console

GIB = 1024**3


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.1f} GiB"


def render_gpus(doc: dict[str, Any]) -> Any:
    """A rich renderable: one row per GPU, then its last fault and the operator action."""
    from rich import box
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("gpu", "uuid", "health", "used by", "ECC uncorr (vol/agg)", "remap (corr/unc/pend/fail)"):
        table.add_column(column, no_wrap=True)
    table.add_column("throttled", overflow="fold")
    notes: list[str] = []
    if not doc["gpus"]:
        notes.append(
            "no GPU is watched (the plan uses none, or NVML could not start: see the supervisor's log)"
        )
    for g in doc["gpus"]:
        c = g["counters"] or {}
        health = "[green]healthy[/]" if g["healthy"] else "[bold red]quarantined[/]"
        if g["spare"]:
            health += " [dim](spare)[/]"
        users = (
            ", ".join(
                f"{u['process'] or 'pid ' + str(u['pid'])} {_gib(u['used_bytes'])}" for u in g["memory"]
            )
            or "-"
        )
        remap = "/".join(
            str(c.get(k, "-") if c.get(k) is not None else "-")
            for k in ("remap_corrected", "remap_uncorrected", "remap_pending", "remap_failure")
        )
        table.add_row(
            str(g["index"]),
            escape(g["uuid"]),
            health,
            escape(users),
            f"{c.get('ecc_uncorrected_volatile', '-')}/{c.get('ecc_uncorrected_aggregate', '-')}",
            remap,
            escape(", ".join(g["throttled_by"]) or "-"),
        )
        fault = g["last_fault"]
        if g["quarantine"]:
            notes.append(f"[bold red]GPU {g['index']}[/]: quarantined: {escape(g['quarantine'])}")
        if fault is not None:
            notes.append(
                f"[bold]GPU {g['index']}[/] last fault: {escape(fault['what'])} ({escape(fault['meaning'])}), "
                f"{fault['class']}, from {fault['source']}; operator: {escape(fault['action'])}"
            )
        if g["quarantine"]:
            notes.append(f"  after a reset: [bold]lmcache-supervise gpus clear {g['index']}[/]")
    return Group(table, *(Text.from_markup(n) for n in notes))


@main.group("gpus", invoke_without_command=True)
@deployment_option
@click.option(
    "--json", "as_json", is_flag=True, help="Print the GPU document (index, UUID, health, faults, counters)."
)
@click.pass_context
@handles_errors
def gpus_command(ctx: click.Context, deployment: str | None, as_json: bool) -> None:
    """Show the deployment's GPUs: health, quarantine, last fault and its meaning, memory users, ECC and remap counters, throttling."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = deployment
        return
    from supervisor.control import client as control

    doc = control.request(find_deployment(deployment), {"op": "gpus"})["gpus"]
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        make_console().print(render_gpus(doc))


@gpus_command.command("clear")
@click.argument("gpu", type=click.IntRange(min=0))
@deployment_option
@click.pass_context
@handles_errors
def gpus_clear(ctx: click.Context, gpu: int, deployment: str | None) -> None:
    """End GPU N's quarantine after an operator reset it; a process held for it starts again."""
    from supervisor.control import client as control

    answer = control.request(find_deployment(deployment or ctx.obj), {"op": "gpu-clear", "gpu": gpu})
    click.echo(answer["note"])
