"""The supervisor under test, in a process of its own: ``python driver.py SCENARIO.json``.

It builds a :class:`~supervisor.spec.Plan` by hand (as the tests do: profiles describe Dynamo
processes, not bench fixtures) and runs it with :func:`supervisor.foreground.run`, the same entry point
``lmcache-supervise up`` uses, signal handling and pid file included. Every runner event goes to
stdout as one JSON line, with the runner's own timestamp (``time.monotonic()``); supervisor logs go
to stderr as JSON, as under ``up`` without a terminal. SIGTERM is the orderly shutdown.

Scenario: ``{"state_dir": str, "processes": [{"name", "argv", "env", "depends_on": [[name, cond]],
"probes": null | {"ready_url", "live_url", "owned_port", "json_status"}, "restart": {...},
"stop_timeout_s"}]}``. ``probes`` are the plan's defaults for a worker (``policies.probes`` over a
default ``[health]`` table), pointed at the given URLs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import proctools

from supervisor.engine import foreground, logs
from supervisor.engine.states import DeploymentEvent, ProcessEvent, RunnerEvent
from supervisor.plan import policies
from supervisor.plan.spec import (
    Condition,
    Dependency,
    HttpCheck,
    Plan,
    Probes,
    ProcessSpec,
    RestartPolicy,
    Role,
)
from supervisor.profile import schema

#: The load budget a default worker gets when its profile sets none (only bounds the startup probe).
STARTUP_BUDGET_S = 600.0


def default_probes(raw: dict[str, Any] | None) -> Probes:
    """What ``plan.render`` gives a worker with a default ``[health]`` table, at these URLs."""
    if raw is None:
        return Probes()
    ready = HttpCheck(
        url=raw["ready_url"],
        owned_port=raw.get("owned_port"),
        json_field="status" if raw.get("json_status") else None,
        json_value="ready" if raw.get("json_status") else None,
    )
    live = HttpCheck(url=raw["live_url"], owned_port=raw.get("owned_port"))
    # The plan's own function, so that "default probes" cannot drift from what profiles get.
    return policies.probes(schema.Health(), ready, live, STARTUP_BUDGET_S)


def build(scenario: dict[str, Any]) -> Plan:
    state = Path(scenario["state_dir"])
    processes = []
    for raw in scenario["processes"]:
        name = raw["name"]
        processes.append(
            ProcessSpec(
                name=name,
                role=Role.CUSTOM,
                argv=tuple(raw["argv"]),
                env=raw.get("env", {}),
                gpus=(),
                ports={},
                multiproc_dir="",
                log_file=str(state / "logs" / f"{name}.log"),
                depends_on=tuple(Dependency(dep, Condition(cond)) for dep, cond in raw.get("depends_on", [])),
                probes=default_probes(raw.get("probes")),
                restart=RestartPolicy(**raw.get("restart", {})),
                stop_timeout_s=float(raw.get("stop_timeout_s", 10.0)),
            )
        )
    deployment = proctools.fixture_deployment("bench", state, ready_timeout_s=600.0)
    return Plan(deployment=deployment, processes=tuple(processes))


def emit(event: RunnerEvent) -> None:
    """One JSON line per event; the bench reads the pipe continuously, so this never blocks long."""
    if isinstance(event, ProcessEvent):
        raw = {
            "kind": "process",
            "name": event.name,
            "old": event.old.value,
            "new": event.new.value,
            "pid": event.pid,
            "at": event.at,
            "reason": event.reason,
        }
    elif isinstance(event, DeploymentEvent):
        raw = {
            "kind": "deployment",
            "old": event.old.value,
            "new": event.new.value,
            "at": event.at,
            "reason": event.reason,
        }
    else:
        return
    sys.stdout.write(json.dumps(raw) + "\n")
    sys.stdout.flush()


def main() -> int:
    scenario = json.loads(Path(sys.argv[1]).read_text())
    logs.configure(json=True, stream=sys.stderr)
    code = foreground.run(build(scenario), observers=[emit])
    sys.stdout.write(json.dumps({"kind": "exit", "at": time.monotonic(), "reason": str(code)}) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
