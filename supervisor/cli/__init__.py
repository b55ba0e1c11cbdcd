"""The command line: the only package that prints or exits.

:mod:`~supervisor.cli.app` holds the click group and the options shared by commands; each command
family has its own module (pipeline: plan/check/up/down/reload; control: status/restart/stop/start/
logs/metrics/smoke; deploy: systemd/export; init: a profile sized for a host). Importing them here registers them on ``main``.
"""

from supervisor.cli import control, deploy, gpus, init, observe, pipeline, status  # noqa: F401  (registers the commands)
from supervisor.cli.app import main

__all__ = ["main"]
