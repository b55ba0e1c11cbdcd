"""What the CLI shows of a plan: a redacted JSON view and a readable table.

Presentation helpers only (the CLI calls them); secrets are masked here, once, for every output.
"""

from __future__ import annotations

import shlex
from typing import Any

from rich.console import Console
from rich.table import Table

from supervisor.plan.spec import Dependency, Plan, ProcessSpec, to_jsonable
from supervisor.redact import redact_argv, redact_env


def process_view(spec: ProcessSpec) -> dict[str, Any]:
    view: dict[str, Any] = to_jsonable(spec)
    view["argv"] = redact_argv(spec.argv)
    view["env"] = redact_env(dict(sorted(spec.env.items())))
    return view


def plan_view(plan: Plan) -> dict[str, Any]:
    """``{"deployment": {...}, "processes": [...]}`` in start order, secrets masked."""
    deployment = to_jsonable(plan.deployment)
    deployment["lmcache"] = redact_env(dict(sorted(plan.deployment.lmcache.items())))
    return {"deployment": deployment, "processes": [process_view(p) for p in plan.processes]}


def _dependency(plan: Plan, dep: Dependency) -> str:
    """``decode healthy``, or ``decode 1/2 healthy`` when the dependency is a group of replicas."""
    members = len(plan.members(dep.name))
    count = f" {dep.min_ready}/{members}" if members > 1 else ""
    return f"{dep.name}{count} {dep.condition.value}"


def print_plan_table(plan: Plan, console: Console | None = None) -> None:
    console = console or Console()
    d = plan.deployment
    console.print(
        f"[bold]{d.name}[/] ({d.engine}, model {d.served_model_name}) from {d.profile}\n"
        f"  OpenAI API {d.base_url}/v1   state {d.state_dir}   discovery {d.discovery}",
        soft_wrap=True,
    )
    if d.credentials_file:  # the path only: the secrets never leave that 0600 file
        console.print(
            f"  cluster credentials {d.credentials_file} (etcd and nats-server require them; "
            "copy the head's file to this path on each worker node)",
            soft_wrap=True,
        )
    if d.open_listeners:  # accepted by discovery.insecure[_planes]: say so at every plan
        console.print(
            f"  [yellow]open to any client[/]: {'; '.join(d.open_listeners)}; allow only your nodes "
            'with a firewall (README, "Several machines")',
            soft_wrap=True,
            highlight=False,
        )
    table = Table()
    for column in ("#", "process", "role", "gpus", "ports", "after", "lmcache"):
        table.add_column(column)
    for index, spec in enumerate(plan.processes, 1):
        after = ", ".join(_dependency(plan, dep) for dep in spec.depends_on) or "-"
        ports = ", ".join(f"{k} {v}" for k, v in sorted(spec.ports.items()))
        gpus = ",".join(map(str, spec.gpus)) or "-"
        table.add_row(
            str(index), spec.name, spec.role.value, gpus, ports, after, "yes" if spec.loads_lmcache else "-"
        )
    console.print(table)
    for spec in plan.processes:
        console.print(
            f"[bold]{spec.name}[/]: " + shlex.join(redact_argv(spec.argv)),
            soft_wrap=True,
            highlight=False,
        )
    lm = redact_env(dict(sorted(plan.deployment.lmcache.items())))
    if lm:
        loaders = [s.name for s in plan.processes if s.loads_lmcache]
        console.print(
            f"LMCache in {', '.join(loaders) or 'no process'}: "
            + " ".join(f"{k}={v}" for k, v in lm.items()),
            soft_wrap=True,
        )
