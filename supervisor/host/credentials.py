"""The cluster credentials: generated once on the head, copied to each worker node, read at spawn.

When the head's etcd or nats-server listens beyond loopback (and the profile does not say
``discovery.insecure = true``), both require a secret. The head writes it once, 0600, into its 0700
state directory as ``cluster-credentials``: ``NAME=VALUE`` lines that are exactly the environment
Dynamo 1.6.1's runtime reads (``ETCD_AUTH_USERNAME``/``ETCD_AUTH_PASSWORD``, ``NATS_AUTH_TOKEN``),
so the supervisor adds them to every Dynamo process at spawn and the plan never holds them. The
nats-server gets the token from a config file beside it (``nats-auth.conf``, 0600), never on its
command line where ``ps`` would show it. A worker node needs a copy of the head's file in its own
state directory (README, "Several machines"); without one it refuses to start (exit 2).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from supervisor.errors import StateDirError
from supervisor.plan.infra import CREDENTIALS_FILE, NATS_AUTH_CONFIG
from supervisor.plan.spec import Plan, Role

FILE_NAME = CREDENTIALS_FILE
NATS_CONFIG_NAME = NATS_AUTH_CONFIG
ETCD_USER = "root"  # etcd's auth needs a root user before it can be enabled; Dynamo connects as it
KEYS = ("ETCD_AUTH_USERNAME", "ETCD_AUTH_PASSWORD", "NATS_AUTH_TOKEN")


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a fresh 0600 file (replacing an old one atomically)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def generate(path: str | os.PathLike[str]) -> dict[str, str]:
    """Create the credentials file at ``path`` unless it exists; return its values."""
    path = Path(path)
    if not path.exists():
        values = {
            "ETCD_AUTH_USERNAME": ETCD_USER,
            "ETCD_AUTH_PASSWORD": secrets.token_hex(24),
            "NATS_AUTH_TOKEN": secrets.token_hex(24),
        }
        _write_private(path, "".join(f"{k}={v}\n" for k, v in values.items()))
    return read(path)


def read(path: str | os.PathLike[str]) -> dict[str, str]:
    """The values in the credentials file; one clear error when it is missing, open to others, or
    malformed (never quoting a value)."""
    path = Path(path)
    where, name = str(path.parent), path.name
    try:
        info = os.stat(path)
        text = path.read_text()
    except FileNotFoundError:
        raise StateDirError(
            where,
            f"{name} is missing: copy the head's {name} (from its state directory) here, mode 0600 "
            '(README, "Several machines")',
        ) from None
    except OSError as exc:
        raise StateDirError(where, f"{name}: cannot read it ({exc.strerror})") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise StateDirError(where, f"{name} is readable by others: chmod 600 {path}")
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        key, eq, value = line.partition("=")
        if not line.strip():
            continue
        if (
            not eq
            or key not in KEYS
            or not value
            or not value.isprintable()
            or any(c in value for c in ' "\\')
        ):
            raise StateDirError(
                where, f"{name}: line {number}: expected NAME=VALUE with NAME one of {', '.join(KEYS)}"
            )
        values[key] = value
    missing = [k for k in KEYS if k not in values]
    if missing:
        raise StateDirError(where, f"{name}: {', '.join(missing)} missing")
    return values


def problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``read(path)`` would fail, as the error's line (for preflight), or None."""
    try:
        read(path)
    except StateDirError as exc:
        return str(exc)
    return None


def write_nats_config(credentials: str | os.PathLike[str], config: str | os.PathLike[str]) -> None:
    """nats-server's config file holding the token (its command line would show it in ``ps``)."""
    token = read(credentials)["NATS_AUTH_TOKEN"]
    _write_private(Path(config), f'authorization {{\n  token: "{token}"\n}}\n')


def prepare(plan: Plan) -> None:
    """Before anything starts: the head (or a single machine) creates the credentials once and the
    nats-server config from them; a worker node must already hold the head's copy (exit 2 if not)."""
    path = plan.deployment.credentials_file
    if not path:
        return
    if plan.deployment.node_role == "worker":
        read(path)
        return
    generate(path)
    if any(spec.role is Role.NATS for spec in plan.processes):
        write_nats_config(path, Path(plan.deployment.state_dir) / NATS_CONFIG_NAME)
