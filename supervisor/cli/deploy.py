"""Commands that write a deployment out for another system: systemd units and Kubernetes manifests.

Presentation only, like the rest of :mod:`supervisor.cli`: the units come from :mod:`supervisor.export.systemd`, the
manifests from :mod:`supervisor.k8s`.
"""

from __future__ import annotations

import os
import sys

import click

from supervisor.cli.app import F, fail, handles_errors, load_plan, main, node_options, profile_options
from supervisor.errors import EXIT_BAD_INPUT, EXIT_RUNTIME
from supervisor.plan.spec import Plan

# --------------------------------------------------------------------------------------- systemd


@main.group("systemd")
def systemd_group() -> None:
    """Run a deployment as the systemd service lmcache-supervise@DEPLOYMENT."""


def _this_executable() -> str:
    """The ``lmcache-supervise`` script of this installation (beside its interpreter, not resolved:
    a virtual environment's python is a symlink whose target lives elsewhere)."""
    import shutil
    from pathlib import Path

    beside = Path(sys.executable).absolute().with_name("lmcache-supervise")
    if beside.is_file():
        return str(beside)
    found = shutil.which("lmcache-supervise")
    if found is None:
        fail("cannot find the lmcache-supervise executable; pass --executable PATH", EXIT_BAD_INPUT)
    return str(Path(found).absolute())


def _unit_for(
    profile: str,
    overrides: tuple[str, ...],
    model: str | None,
    *,
    executable: str | None,
    user: str,
    template: bool,
    role: str = "all",
    head: str | None = None,
    advertise: str | None = None,
) -> tuple[Plan, str]:
    """The plan (state under the system state root) and the unit text for PROFILE on this node."""
    import shlex
    from pathlib import Path

    from supervisor.export import systemd
    from supervisor.plan import nodes
    from supervisor.plan import render as plans
    from supervisor.profile import load as profiles

    loaded = profiles.load(profile, overrides=overrides, model=model)
    node = nodes.node_options(loaded, role, head=head, advertise=advertise)  # type: ignore[arg-type]
    state_root = Path(systemd.SYSTEM_STATE_ROOT)
    rendered = plans.render(loaded, state_root=state_root, **node.as_kwargs())  # type: ignore[arg-type]
    # The node flags as given: `up` resolves a left-out --advertise itself, on the machine it runs on.
    node_args = (["--role", role] if role != "all" else []) + (["--head", head] if head else [])
    node_args += ["--advertise", advertise] if advertise else []
    # A path is made absolute (systemd starts us in /); a built-in name stays a name.
    is_path = profile.endswith(".toml") or os.sep in profile
    ref = str(profiles.resolve(profile).resolve()) if is_path else profile
    exe = executable or _this_executable()
    words = ["lmcache-supervise", "systemd", "render", ref]
    for override in overrides:
        words += ["--set", override]
    words += ["--model", model] if model is not None else []
    words += node_args
    words += ["--template", "--executable", exe] if template else []
    options = systemd.UnitOptions(
        executable=exe,
        profile_ref=None if template else ref,
        overrides=overrides,
        model=model,
        up_args=tuple(node_args),
        user=user,
        group=user,
        command=shlex.join(words),
    )
    return rendered, systemd.render_unit(rendered, options)


def unit_options(func: F) -> F:
    func = click.option(
        "--user",
        default="lmcache",
        show_default=True,
        help="The dedicated user (and group) the service runs as.",
    )(func)
    return click.option(
        "--executable",
        default=None,
        metavar="PATH",
        help="lmcache-supervise as the service should run it (default: this installation's).",
    )(func)


@systemd_group.command("render")
@profile_options
@node_options
@unit_options
@click.option(
    "--template",
    is_flag=True,
    help="Print the lmcache-supervise@.service template (%i for the profile), with PROFILE's timeouts.",
)
@handles_errors
def systemd_render_command(
    profile: str,
    overrides: tuple[str, ...],
    model: str | None,
    role: str,
    head: str | None,
    advertise: str | None,
    executable: str | None,
    user: str,
    template: bool,
) -> None:
    """Print the unit for PROFILE: ExecStart with this installation's paths, timeouts from its plan."""
    _, text = _unit_for(
        profile,
        overrides,
        model,
        executable=executable,
        user=user,
        template=template,
        role=role,
        head=head,
        advertise=advertise,
    )
    click.echo(text, nl=False)


@systemd_group.command("install")
@profile_options
@node_options
@unit_options
@click.option(
    "--unit-dir",
    default="/etc/systemd/system",
    show_default=True,
    metavar="DIR",
    help="Where to write the unit.",
)
@handles_errors
def systemd_install_command(
    profile: str,
    overrides: tuple[str, ...],
    model: str | None,
    role: str,
    head: str | None,
    advertise: str | None,
    executable: str | None,
    user: str,
    unit_dir: str,
) -> None:
    """Write lmcache-supervise@DEPLOYMENT.service (as root) and print the systemctl commands to run."""
    import pwd
    import shlex
    import tempfile
    from pathlib import Path

    from supervisor.export import systemd

    rendered, text = _unit_for(
        profile,
        overrides,
        model,
        executable=executable,
        user=user,
        template=False,
        role=role,
        head=head,
        advertise=advertise,
    )
    name = systemd.unit_name(rendered.deployment.name)
    target = Path(unit_dir) / name
    try:
        # Whole or not at all: systemd may read the directory at any moment (daemon-reload).
        with tempfile.NamedTemporaryFile("w", dir=unit_dir, prefix=f".{name}.", delete=False) as tmp:
            try:
                tmp.write(text)
                os.fchmod(tmp.fileno(), 0o644)
                tmp.flush()
                os.replace(tmp.name, target)
            except BaseException:
                os.unlink(tmp.name)
                raise
    except PermissionError:
        fail(f"{unit_dir}: permission denied; run `sudo lmcache-supervise systemd install ...`", EXIT_RUNTIME)
    click.echo(f"wrote {target}")
    click.echo("now run:")
    try:
        pwd.getpwnam(user)
    except KeyError:
        home = f"/var/lib/{systemd.STATE_DIRECTORY}"
        click.echo(
            f"  useradd --system --user-group --home-dir {home} --no-create-home "
            f"--shell /usr/sbin/nologin {shlex.quote(user)}"
        )
    for command in ("daemon-reload", f"enable --now {name}", f"status {name}"):
        click.echo(f"  systemctl {command}")
    click.echo(f"  journalctl -u {name} -f")
    click.echo(f"after editing the profile: systemctl reload {name}")


# ---------------------------------------------------------------------------------------- export


@main.group("export")
def export_group() -> None:
    """Render PROFILE for another deployment system (the supervisor is not involved there)."""


@export_group.command("k8s")
@profile_options
@click.option(
    "--image",
    default=None,
    metavar="IMAGE",
    help="Container image for every component (default: Dynamo 1.6.1's runtime image for the engine).",
)
@click.option("--namespace", default=None, metavar="NS", help="metadata.namespace of the manifest.")
@click.option(
    "--secret-name",
    default=None,
    metavar="NAME",
    help="The Secret that credentials are referenced from (default: <name>-secrets).",
)
@handles_errors
def export_k8s_command(
    profile: str,
    overrides: tuple[str, ...],
    model: str | None,
    image: str | None,
    namespace: str | None,
    secret_name: str | None,
) -> None:
    """Print PROFILE as a Kubernetes DynamoGraphDeployment (nvidia.com/v1beta1, Dynamo 1.6.1) in YAML.

    Credentials become secretKeyRef entries; what to create is printed on stderr."""
    import yaml

    from supervisor.export import k8s

    rendered = load_plan(profile, overrides, model)
    out = k8s.export(rendered, image=image, namespace=namespace, secret_name=secret_name)
    click.echo(
        f"# {k8s.KIND} for Dynamo {k8s.DYNAMO_VERSION} ({k8s.API_VERSION}), "
        f"rendered by lmcache-supervise from {rendered.deployment.profile}"
    )
    click.echo(yaml.safe_dump(out.manifest, sort_keys=False, width=100000), nl=False)
    for note in out.notes:
        click.echo(f"lmcache-supervise: note: {note}", err=True)
