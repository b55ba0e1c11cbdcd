"""The systemd unit for a deployment, rendered purely from its plan.

``render_unit(plan, options)`` returns the text of ``lmcache-supervise@<name>.service``: the same plan
and options give the same bytes, and nothing here looks at the machine (the CLI resolves the
executable and the profile path, and writes the file). ``systemd/lmcache-supervise@.service`` in the
repository is this function's output for the template (``%i`` instead of a profile), checked by a test.

What the numbers mean:

* ``TimeoutStartSec``: until ``READY=1``. The longest chain of startup budgets along ``depends_on``
  (a prefill worker waits for its decode worker to be healthy), or the deployment's ready timeout
  if longer, plus a margin for preflight and the smoke request. While a model is still loading the
  supervisor also sends ``EXTEND_TIMEOUT_USEC``, so a slow but progressing load is never cut off.
* ``TimeoutStopSec``: the supervisor stops processes in reverse order, each with its own grace
  period and a SIGKILL wait after it; the unit waits for the sum of those, plus a margin, before
  systemd's own SIGKILL.
* ``WatchdogSec``: the supervisor pings every half of it from its event loop; a loop stuck that long
  gets the service killed and restarted.

Hardening keeps GPU access: no ``PrivateDevices``, a closed device policy that allows every NVIDIA
character device group (``char-nvidia*`` matches ``nvidia``, ``nvidiactl``, ``nvidia-uvm``,
``nvidia-caps``, ``nvidia-nvswitch``, ``nvidia-nvlink``, ``nvidia-fs`` in ``/proc/devices``) and, for
plans that move KV caches over NIXL, the RDMA devices. What is deliberately left out, and why, is
said next to it in the unit itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

from supervisor.errors import EXIT_BAD_INPUT, PlanError
from supervisor.plan.policies import startup_budget_s
from supervisor.plan.spec import Condition, Plan

UNIT_PREFIX = "lmcache-supervise"
STATE_DIRECTORY = "lmcache-supervise"  # StateDirectory=: one subdirectory per deployment
SYSTEM_STATE_ROOT = f"/var/lib/{STATE_DIRECTORY}"  # what StateDirectory= gives a system service
#: systemd's SIGKILL wait after a process's grace period (mirrors ``process.GROUP_KILL_WAIT_S``).
KILL_WAIT_S = 5.0
#: Preflight (NVML, port owners, a Redis PING), interpreter start and the smoke request.
START_MARGIN_S = 120
#: Logging the shutdown, removing state, the guardian's last sweep.
STOP_MARGIN_S = 30
WATCHDOG_SEC = 30
RESTART_SEC = 10
START_LIMIT_BURST = 5
START_LIMIT_INTERVAL_S = 600
#: Device groups (names in /proc/devices; globs allowed) every GPU deployment may open.
GPU_DEVICE_GROUPS = ("char-nvidia*",)
#: RDMA for NIXL/UCX: verbs by group, rdma_cm by path (it is a misc device, major 10, shared with
#: much else, so the path keeps the allowance narrow).
RDMA_DEVICE_GROUPS = ("char-infiniband_verbs",)
RDMA_DEVICE_PATHS = ("/dev/infiniband/rdma_cm",)
#: Where ProtectHome=yes would hide files the service must read (a venv or profile under /home).
HOME_ROOTS = ("/home", "/root", "/run/user")


@dataclass(frozen=True)
class UnitOptions:
    """What the unit needs besides the plan.

    ``executable``: absolute path of ``lmcache-supervise``. ``profile_ref``: what ``up`` is given (a
    built-in name or an absolute path); None renders the template, which passes ``%i``.
    ``overrides``/``model``: the ``--set``/``--model`` flags, passed on to ``up`` unchanged, as are
    ``up_args`` (this node's ``--role``/``--head``/``--advertise`` on a several-machine deployment).
    """

    executable: str
    profile_ref: str | None
    overrides: tuple[str, ...] = ()
    model: str | None = None
    up_args: tuple[str, ...] = ()
    user: str = "lmcache"
    group: str = "lmcache"
    watchdog_s: int = WATCHDOG_SEC
    #: How to produce this file again, quoted in its first line.
    command: str = "lmcache-supervise systemd render"


@dataclass(frozen=True)
class Timeouts:
    """Seconds for ``TimeoutStartSec``, ``TimeoutStopSec``, ``WatchdogSec``, and ``down``'s own wait."""

    start_s: int
    stop_s: int
    watchdog_s: int
    down_s: int


def unit_name(deployment: str | None) -> str:
    """``lmcache-supervise@<deployment>.service``, or the template name for None."""
    return f"{UNIT_PREFIX}@{deployment or ''}.service"


def critical_start_s(plan: Plan) -> float:
    """The longest chain of startup budgets along ``depends_on`` (processes come in start order).

    A ``healthy`` dependency holds its dependent back until its own startup has passed; a
    ``started`` one only until it was spawned.
    """
    start: dict[str, float] = {}
    finish: dict[str, float] = {}
    for spec in plan.processes:
        start[spec.name] = max(
            (
                finish[d.name] if d.condition is Condition.HEALTHY else start[d.name]
                for d in spec.depends_on
                if d.name in start
            ),
            default=0.0,
        )
        finish[spec.name] = start[spec.name] + startup_budget_s(spec)
        if spec.group != spec.name:  # a dependency on a replica group: its slowest member bounds it
            start[spec.group] = max(start.get(spec.group, 0.0), start[spec.name])
            finish[spec.group] = max(finish.get(spec.group, 0.0), finish[spec.name])
    return max(finish.values(), default=0.0)


def timeouts(plan: Plan, *, watchdog_s: int = WATCHDOG_SEC) -> Timeouts:
    smoke_s = plan.deployment.smoke.timeout_s if plan.deployment.smoke else 0.0
    start = max(critical_start_s(plan), plan.deployment.ready_timeout_s) + smoke_s + START_MARGIN_S
    stop = sum(spec.stop_timeout_s + KILL_WAIT_S for spec in plan.processes)
    # ``down`` (ExecStop) gives up before systemd does, so that its failure is what the journal shows.
    return Timeouts(
        start_s=math.ceil(start),
        stop_s=math.ceil(stop) + STOP_MARGIN_S,
        watchdog_s=watchdog_s,
        down_s=math.ceil(stop) + STOP_MARGIN_S // 2,
    )


# ------------------------------------------------------------------------------------ quoting

_BARE = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


@dataclass(frozen=True)
class Specifier:
    """A systemd specifier written as is (``%i``), where every other word is escaped."""

    text: str


INSTANCE = Specifier("%i")
Word = str | Specifier


def escape_specifiers(text: str) -> str:
    """A literal for systemd: ``%`` starts a specifier and ``$`` a variable in Exec lines."""
    return text.replace("%", "%%").replace("$", "$$")


def exec_word(word: Word, *, source: str = "unit") -> str:
    """One argument of an ``Exec*=`` line, quoted only when it has to be."""
    if isinstance(word, Specifier):
        return word.text
    if any(c in word for c in "\n\r\0"):
        raise PlanError(
            source, "systemd", f"{word!r} cannot be written into a systemd unit (a line break or NUL)"
        )
    escaped = escape_specifiers(word)
    if _BARE.fullmatch(word):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_line(argv: Iterable[Word], *, source: str = "unit") -> str:
    return " ".join(exec_word(a, source=source) for a in argv)


def path_word(path: str) -> str:
    """A path in a space-separated list setting (``ReadWritePaths=``): ``%`` escaped, quoted if spaced."""
    escaped = path.replace("%", "%%")
    return f'"{escaped}"' if " " in path else escaped


# ------------------------------------------------------------------------------------ rendering


def _writable_paths(plan: Plan) -> list[str]:
    """Paths outside the unit's own directories that children write: LMCache's disk tier and GDS."""
    found: set[str] = set()
    for env in (plan.deployment.lmcache, *(spec.env for spec in plan.processes)):
        for key in ("LMCACHE_LOCAL_DISK", "LMCACHE_GDS_PATH"):
            path = env.get(key, "").removeprefix("file://").rstrip("/")
            if path.startswith("/"):
                found.add(path)
    return sorted(found)


def _under_home(paths: Iterable[str]) -> bool:
    return any(
        PurePosixPath(path).is_relative_to(root)
        for path in paths
        if path.startswith("/")
        for root in HOME_ROOTS
    )


def _uses_rdma(plan: Plan) -> bool:
    return any("nixl" in spec.ports for spec in plan.processes)


def render_unit(plan: Plan, options: UnitOptions) -> str:
    """The unit text; ``options.profile_ref`` None renders the ``lmcache-supervise@.service`` template."""
    source = plan.deployment.profile
    if not options.executable.startswith("/"):
        raise PlanError(source, "systemd", f"the executable {options.executable!r} is not an absolute path")
    t = timeouts(plan, watchdog_s=options.watchdog_s)
    template = options.profile_ref is None
    instance: Word = INSTANCE if template else plan.deployment.name
    instance_text = exec_word(instance, source=source)
    exe = options.executable
    up: list[Word] = [exe, "up", INSTANCE if options.profile_ref is None else options.profile_ref]
    for override in options.overrides:
        up += ["--set", override]
    if options.model is not None:
        up += ["--model", options.model]
    up += options.up_args
    state_env = f"%S/{STATE_DIRECTORY}"
    writable = _writable_paths(plan)
    read_paths = [exe, plan.deployment.python, plan.deployment.model, options.profile_ref or ""]
    protect_home = "read-only" if _under_home([*read_paths, *writable]) else "yes"

    lines = [
        "# Written by:",
        f"#   {options.command}",
        "# Change the profile and render again rather than editing this file: the timeouts come from the",
        "# deployment's plan. Instance = deployment name. The service user must be able to read the",
        "# executable's virtual environment, the profile and the model, and open /dev/nvidia* (the",
        "# driver's default mode is 0666).",
        "[Unit]",
        f"Description=Dynamo + vLLM + LMCache deployment {instance_text} (lmcache-supervise)",
        "After=network-online.target nvidia-persistenced.service",
        "Wants=network-online.target",
        f"StartLimitIntervalSec={START_LIMIT_INTERVAL_S}",
        f"StartLimitBurst={START_LIMIT_BURST}",
        "",
        "[Service]",
        "# READY=1 comes only once the model answers; STATUS= follows every deployment state change.",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={exec_line(up, source=source)}",
        "# SIGHUP: re-read the profile, restart only the processes whose plan changed.",
        f"ExecReload={exec_line([exe, 'reload', instance], source=source)}",
        "# The ordered shutdown (reverse start order, each process's own signal and grace period) runs",
        "# here; whatever is still in the control group afterwards is killed by KillMode=control-group.",
        f"ExecStop=-{exec_line([exe, 'down', instance, '--timeout', str(t.down_s)], source=source)}",
        "KillMode=control-group",
        f"TimeoutStartSec={t.start_s}",
        f"TimeoutStopSec={t.stop_s}",
        f"WatchdogSec={t.watchdog_s}",
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}",
        "# Exit 2 is a profile that does not validate: restarting cannot fix it.",
        f"RestartPreventExitStatus={EXIT_BAD_INPUT}",
        "# A worker killed by the kernel's OOM killer is the supervisor's to restart (with backoff and a",
        "# crash-loop limit); systemd's default OOMPolicy=stop would take the whole deployment down.",
        "OOMPolicy=continue",
        f"User={options.user}",
        f"Group={options.group}",
        f"StateDirectory={STATE_DIRECTORY}",
        f"RuntimeDirectory={UNIT_PREFIX}/{instance_text}",
        f"LogsDirectory={STATE_DIRECTORY}",
        f"CacheDirectory={STATE_DIRECTORY}",
        f"Environment=LMCACHE_SUPERVISE_STATE_ROOT={state_env}",
        "# vLLM, Triton, FlashInfer and the Hugging Face hub cache under HOME and XDG_CACHE_HOME.",
        f"Environment=HOME={state_env}",
        f"Environment=XDG_CACHE_HOME=%C/{STATE_DIRECTORY}",
        "Environment=PYTHONUNBUFFERED=1",
        "# Pinned host memory for NIXL/UCX and LMCache; vLLM opens many files.",
        "LimitMEMLOCK=infinity",
        "LimitNOFILE=1048576",
        "UMask=0027",
        "",
        "# Hardening that keeps the GPUs. Left out on purpose: PrivateDevices (hides /dev/nvidia*),",
        "# MemoryDenyWriteExecute (breaks Triton and CUDA JIT), ProcSubset=pid (hides /proc/driver/nvidia),",
        "# RestrictAddressFamilies (UCX and RDMA need more than inet and unix).",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ProtectHome={protect_home}",
        "PrivateTmp=yes",
        "# No module loading: nvidia-modprobe cannot run here, so /dev/nvidia-uvm must exist before we",
        "# start (nvidia-persistenced or the driver's udev rules create it).",
        "ProtectKernelModules=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "# Shared memory (NCCL, vLLM's worker processes) left behind by the service user goes at stop.",
        "RemoveIPC=yes",
        *(f"ReadWritePaths=-{path_word(path)}" for path in writable),
        "# /proc/devices groups: nvidia, nvidiactl, nvidia-uvm, nvidia-caps, nvidia-nvswitch, nvidia-fs.",
        "DevicePolicy=closed",
        *(f"DeviceAllow={group} rw" for group in GPU_DEVICE_GROUPS),
    ]
    if _uses_rdma(plan):
        lines.append("# NIXL moves KV caches over RDMA where the host has it.")
        lines += [f"DeviceAllow={group} rw" for group in RDMA_DEVICE_GROUPS]
        lines += [f"DeviceAllow={path} rw" for path in RDMA_DEVICE_PATHS]
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)
