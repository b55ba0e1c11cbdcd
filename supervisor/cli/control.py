"""The commands that talk to a running deployment: status, restart, stop, start, logs, metrics, smoke, down.

Presentation and exit codes only; the work is in :mod:`supervisor.control` (the socket client,
scrape, smoke, logtail). ``supervisor.cli`` imports this module, which registers the commands.
"""

from __future__ import annotations

import json
import sys
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


def _find(deployment: str | None) -> Any:
    from supervisor import paths
    from supervisor.control import server as control

    return control.find(paths.state_root(), deployment)


def _status(endpoint: Any) -> dict[str, Any]:
    from supervisor.control import server as control

    return control.request(endpoint, {"op": "status"})["status"]


def _console() -> Any:
    """A rich console; piped output gets a wide page instead of rich's 80 columns (no truncated tables)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


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
        f"at {escape(dep['base_url'])}/v1  up {_duration(dep['uptime_s'])}  "
        f"ready in {_duration(dep['time_to_ready_s'])}"
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
                f"ok {_duration(probe['latency_s'])}"
                if probe["ok"]
                else f"[red]fail[/] {_duration(probe['latency_s'])}"
            )
        )
        last = (p["last_exit"]["signal"] or f"code {p['last_exit']['code']}") if p["last_exit"] else "-"
        name = escape(p["name"]) + (f" [dim]({escape(p['role'])})[/]" if p["role"] != p["name"] else "")
        table.add_row(
            name,
            f"[{_STATE_STYLE.get(p['state'], '')}]{p['state']}[/]",
            str(p["pid"] or "-"),
            _duration(p["uptime_s"]),
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
    endpoint = _find(deployment)
    console = _console()
    if not watch:
        doc = _status(endpoint)
        if as_json:
            click.echo(json.dumps(doc, indent=2))
        else:
            console.print(render_status(doc))
        return
    try:
        if as_json:  # one document per line: a stream a script can read
            while True:
                click.echo(json.dumps(_status(endpoint)))
                time.sleep(interval)
        from rich.live import Live

        with Live(render_status(_status(endpoint)), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render_status(_status(endpoint)), refresh=True)
    except KeyboardInterrupt:
        return
    except ControlError:
        from supervisor import paths
        from supervisor.engine import pidfile

        if any(e.pid == endpoint.pid for e in pidfile.running(paths.state_root())):
            raise
        click.echo(f"{endpoint.deployment} stopped (supervisor pid {endpoint.pid} is gone)", err=True)


def _act(op: str, process: str, deployment: str | None, wait_s: float) -> dict[str, Any]:
    from supervisor.control import server as control

    endpoint = _find(deployment)
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
    endpoint = _find(deployment)
    from supervisor.control import server as control

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


def _log_source(process: str, deployment: str | None) -> tuple[str, list[dict[str, Any]]]:
    """The log file of ``process`` and its hints: from the running supervisor, else from the state root."""
    from supervisor import paths
    from supervisor.control import hints as diagnose
    from supervisor.control import status as statusview
    from supervisor.engine import pidfile

    root = paths.state_root()
    live = pidfile.running(root)
    if live and (deployment is None or any(e.deployment == deployment for e in live)):
        doc = _status(_find(deployment))
        for p in doc["processes"]:
            if p["name"] == process:
                return p["log_file"], p["hints"]
        names = ", ".join(p["name"] for p in doc["processes"])
        raise BadRequestError(
            f"no process {process!r} in deployment {doc['deployment']['name']!r} (processes: {names})"
        )
    # Nothing running: the logs of a stopped deployment are still worth reading.
    dirs = [root / deployment] if deployment else sorted(d for d in root.glob("*") if (d / "logs").is_dir())
    if len(dirs) != 1:
        raise ControlError(
            f"no running deployment under {root}"
            if not dirs
            else f"several deployments have logs under {root}; name one with --deployment"
        )
    path = dirs[0] / "logs" / f"{process}.log"
    if not path.is_file():
        raise BadRequestError(f"no log for process {process!r} in {path.parent}")
    return str(path), [h.to_json() for h in diagnose.scan(statusview.read_tail(str(path)))]


@main.command("logs")
@click.argument("process")
@deployment_option
@click.option(
    "-f", "--follow", is_flag=True, help="Keep printing new lines (across log rotation) until Ctrl-C."
)
@click.option(
    "-n",
    "--lines",
    "count",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="How many of the last lines to print first.",
)
@handles_errors
def logs_command(process: str, deployment: str | None, follow: bool, count: int) -> None:
    """Print PROCESS's output (stdout and stderr, as the supervisor logged it), then known-problem hints."""
    from supervisor.control import logtail

    path, hints = _log_source(process, deployment)
    try:
        lines, offset = logtail.last_lines(path, count)
    except FileNotFoundError:
        lines, offset = [], 0
    for line in lines:
        click.echo(line)
    for hint in hints:
        click.echo(f"hint ({hint['severity']}): {hint['message']}", err=True)
    if not follow:
        return
    try:
        for line in logtail.follow(path, offset=offset):
            click.echo(line)
    except KeyboardInterrupt:
        return


@main.command("metrics")
@deployment_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per endpoint.")
@handles_errors
def metrics_command(deployment: str | None, as_json: bool) -> None:
    """Summarise the frontend's and workers' /metrics: requests, cached tokens, LMCache hit rate and usage."""
    from rich.table import Table

    from supervisor.control import scrape

    doc = _status(_find(deployment))
    summaries = scrape.collect(scrape.read_targets(doc["deployment"]["targets_file"]))
    if as_json:
        click.echo(
            json.dumps(
                {
                    "supervisor_metrics_url": doc["deployment"]["metrics_url"],
                    "endpoints": [s.to_json() for s in summaries],
                },
                indent=2,
            )
        )
        return
    table = Table(header_style="bold")
    for column in (
        "process",
        "role",
        "requests",
        "cached tokens",
        "KV usage",
        "prefix cache hits",
        "LMCache hit rate",
        "LMCache local",
    ):
        table.add_column(column)

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f}"

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    for s in summaries:
        if s.error:
            table.add_row(s.target.process, s.target.role, f"[red]{s.error}[/]", "", "", "", "", "")
            continue
        requests = num(s.requests) + (f" ({num(s.failed_requests)} failed)" if s.failed_requests else "")
        cached = (
            "-"
            if s.cached_tokens is None
            else f"{num(s.cached_tokens)} of {num(s.input_tokens)} ({pct(s.cached_fraction)})"
        )
        prefix = "-" if s.prefix_hits is None else f"{num(s.prefix_hits)} / {num(s.prefix_queries)}"
        lmc = (
            "-"
            if s.lmcache_hits is None
            else f"{pct(s.lmcache_hit_rate)} ({num(s.lmcache_hits)} / {num(s.lmcache_requested)} tokens)"
        )
        local = (
            "-" if s.lmcache_local_usage_bytes is None else f"{s.lmcache_local_usage_bytes / 2**30:.2f} GiB"
        )
        if s.l1_usage_ratio is not None:  # LMCache's multiprocess server: its L1
            local += f" L1 ({pct(s.l1_usage_ratio)} full)"
        table.add_row(s.target.process, s.target.role, requests, cached, pct(s.kv_usage), prefix, lmc, local)
    console = _console()
    console.print(table)
    if not any(s.lmcache_hits is not None for s in summaries):
        console.print("[dim]no LMCache series exported (mocker workers, or LMCache not loaded yet)[/]")
    if doc["deployment"]["metrics_url"]:
        console.print(
            f"supervisor metrics: {doc['deployment']['metrics_url']}   "
            f"Prometheus file_sd: {doc['deployment']['targets_file']}",
            soft_wrap=True,
        )


@main.command("smoke")
@deployment_option
@click.option(
    "--prompt-tokens",
    type=click.IntRange(min=16, max=1_000_000),
    default=2048,
    show_default=True,
    help="About how long the prompt is (the report shows the real count).",
)
@click.option("--max-tokens", type=click.IntRange(min=1, max=4096), default=8, show_default=True)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0.1),
    default=120.0,
    show_default=True,
    help="Seconds each request may take.",
)
@click.option("--require-hit", is_flag=True, help="Exit 1 unless the repeat shows cache reuse.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handles_errors
def smoke_command(
    deployment: str | None,
    prompt_tokens: int,
    max_tokens: int,
    timeout_s: float,
    require_hit: bool,
    as_json: bool,
) -> None:
    """Send the same long prompt twice: TTFT, total time, cached tokens and worker cache counters for each."""
    from supervisor.control import scrape, smoke

    doc = _status(_find(deployment))
    dep = doc["deployment"]
    try:
        targets = scrape.read_targets(dep["targets_file"])
    except ControlError:
        targets = ()
    try:
        report = smoke.run(
            dep["base_url"],
            dep["model"],
            targets,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            timeout_s=timeout_s,
        )
    except smoke.SmokeError as exc:
        raise ControlError(f"smoke request to {dep['name']!r} failed: {exc}") from None
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(
            f"smoke {dep['name']}: the same ~{prompt_tokens}-token prompt twice via {dep['base_url']}/v1"
        )
        for label, a in zip(("first ", "repeat"), report.attempts):
            counters = ", ".join(f"{k} {v:+,.0f}" for k, v in sorted(a.counters_delta.items())) or "-"
            click.echo(
                f"  {label}: TTFT {_duration(a.ttft_s)}, total {_duration(a.total_s)}, "
                f"{a.prompt_tokens} prompt tokens, {a.cached_tokens} cached; worker counters: {counters}"
            )
        if not report.counters_present:
            click.echo("  workers export no LMCache or vLLM prefix-cache counters (the mocker has none)")
        elif report.run_delta:
            click.echo(
                "  over the run: " + ", ".join(f"{k} {v:+,.0f}" for k, v in sorted(report.run_delta.items()))
            )
        click.echo("cache reuse: " + ("seen" if report.reuse_seen else "not reported by the engine"))
    if require_hit and not report.reuse_seen:
        sys.exit(1)


def down(deployment: str | None, timeout_s: float) -> None:
    """``down``: ask over the control socket, wait for the supervisor to exit; SIGTERM if it does not answer."""
    from supervisor import paths
    from supervisor.control import server as control
    from supervisor.engine import pidfile

    endpoint = _find(deployment)
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
