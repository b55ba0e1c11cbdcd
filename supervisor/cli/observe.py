"""What a running deployment says about itself: ``logs`` (with hints), ``metrics`` and ``smoke``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from supervisor.cli.app import handles_errors, main
from supervisor.cli.control import deployment_option, duration, fetch_status, find_deployment, make_console
from supervisor.errors import BadRequestError, ControlError


def _log_source(process: str, deployment: str | None) -> tuple[str, list[dict[str, Any]]]:
    """The log file of ``process`` and its hints: from the running supervisor, else from the state root."""
    from supervisor import paths
    from supervisor.control import hints as diagnose
    from supervisor.control import status as statusview
    from supervisor.engine import pidfile

    root = paths.state_root()
    live = pidfile.running(root)
    if live and (deployment is None or any(e.deployment == deployment for e in live)):
        doc = fetch_status(find_deployment(deployment))
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

    doc = fetch_status(find_deployment(deployment))
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
    console = make_console()
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

    doc = fetch_status(find_deployment(deployment))
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
                f"  {label}: TTFT {duration(a.ttft_s)}, total {duration(a.total_s)}, "
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
