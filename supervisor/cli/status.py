"""``status``: a running deployment at a glance (table, ``--watch``) or as its JSON document."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from supervisor.cli.app import handles_errors, main
from supervisor.cli.control import deployment_option, duration, fetch_status, find_deployment, make_console
from supervisor.errors import ControlError

_STATE_STYLE = {
    "healthy": "green",
    "ready": "green",
    "starting": "cyan",
    "unhealthy": "yellow",
    "degraded": "yellow",
    "backoff": "yellow",
    "stopping": "magenta",
    "failed": "bold red",
    "stopped": "dim",
}


def render_status(doc: dict[str, Any]) -> Any:
    """A rich renderable: the deployment line, the process table, reasons and hints."""
    from rich import box
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from supervisor.control.status import roles_line

    dep = doc["deployment"]
    state = dep["state"]
    head = Text.from_markup(
        f"[bold]{escape(dep['name'])}[/] [{_STATE_STYLE.get(state, '')}]{state}[/]  model {escape(dep['model'])} "
        f"at {escape(dep['base_url'])}/v1  up {duration(dep['uptime_s'])}  "
        f"ready in {duration(dep['time_to_ready_s'])}"
        + (f"\n  roles {escape(roles_line(doc['roles']))}" if doc.get("roles") else "")
    )
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("process", "state", "pid", "uptime", "restarts", "last exit", "gpus"):
        table.add_column(column, no_wrap=True)
    table.add_column("ports", overflow="fold", min_width=12)
    table.add_column("probe", no_wrap=True)
    notes: list[str] = []
    for p in doc["processes"]:
        probe = p["probe"]
        probe_text = (
            "-"
            if probe is None
            else (
                f"ok {duration(probe['latency_s'])}"
                if probe["ok"]
                else f"[red]fail[/] {duration(probe['latency_s'])}"
            )
        )
        last = (p["last_exit"]["signal"] or f"code {p['last_exit']['code']}") if p["last_exit"] else "-"
        name = escape(p["name"]) + (f" [dim]({escape(p['role'])})[/]" if p["role"] != p["name"] else "")
        table.add_row(
            name,
            f"[{_STATE_STYLE.get(p['state'], '')}]{p['state']}[/]",
            str(p["pid"] or "-"),
            duration(p["uptime_s"]),
            str(p["restarts"]),
            escape(last),
            ",".join(map(str, p["gpus"])) or "-",
            escape(" ".join(f"{k} {v}" for k, v in p["ports"].items()) or "-"),
            probe_text,
        )
        if p["state"] not in ("healthy",) and p["reason"]:
            notes.append(f"[bold]{escape(p['name'])}[/]: {escape(p['reason'])}")
        if probe is not None and not probe["ok"] and probe["error"]:
            notes.append(f"[bold]{escape(p['name'])}[/] probe: {escape(probe['error'])}")
        for hint in p["hints"]:
            style = {"error": "red", "warning": "yellow"}.get(hint["severity"], "dim")
            notes.append(f"[{style}]hint[/] [bold]{escape(p['name'])}[/]: {escape(hint['message'])}")
    return Group(head, table, *(Text.from_markup(n) for n in [*_cache_lines(doc), *notes]))


def _cache_lines(doc: dict[str, Any]) -> list[str]:
    """One line per LMCache server: capacity and, from the multiprocess server's /metrics, L1 use and hits."""
    from rich.markup import escape

    def gib(v: float | None) -> str:
        return "?" if v is None else f"{v / 2**30:.2f} GiB"

    lines = []
    for c in doc.get("cache_servers", []):
        text = f"[bold]{escape(c['process'])}[/] {'healthy' if c['healthy'] else '[yellow]not healthy[/]'}"
        if c.get("metrics_error"):
            text += f", metrics: [red]{escape(c['metrics_error'])}[/]"
        elif "l1_used_bytes" in c:
            text += f", L1 {gib(c['l1_used_bytes'])} of {gib(c['capacity_bytes'])}"
            if c["hit_tokens"] is not None:
                text += f", lookups hit {c['hit_tokens']:,.0f} of {c['requested_tokens'] or 0:,.0f} tokens"
        elif c["capacity_bytes"]:
            text += f", maxmemory {gib(c['capacity_bytes'])}"
        lines.append(text)
    return lines


@main.command("status")
@deployment_option
@click.option("--json", "as_json", is_flag=True, help="Print the status document (schema in the README).")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C or until the deployment stops.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.2),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
@handles_errors
def status_command(deployment: str | None, as_json: bool, watch: bool, interval: float) -> None:
    """Show a running deployment: per-process state, pid, uptime, restarts, exits, GPUs, ports, probes, hints."""
    endpoint = find_deployment(deployment)
    console = make_console()
    if not watch:
        doc = fetch_status(endpoint)
        if as_json:
            click.echo(json.dumps(doc, indent=2))
        else:
            console.print(render_status(doc))
        return
    try:
        if as_json:  # one document per line: a stream a script can read
            while True:
                click.echo(json.dumps(fetch_status(endpoint)))
                time.sleep(interval)
        from rich.live import Live

        with Live(render_status(fetch_status(endpoint)), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render_status(fetch_status(endpoint)), refresh=True)
    except KeyboardInterrupt:
        return
    except ControlError:
        from supervisor import paths
        from supervisor.engine import pidfile

        if any(e.pid == endpoint.pid for e in pidfile.running(paths.state_root())):
            raise
        click.echo(f"{endpoint.deployment} stopped (supervisor pid {endpoint.pid} is gone)", err=True)
