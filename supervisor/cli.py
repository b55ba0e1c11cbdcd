"""The command line: the only module that prints or exits.

Every command turns a :class:`~supervisor.errors.SupervisorError` into one line on stderr and its
exit code (2 bad input, 3 preflight failed, 1 runtime failure); nothing else reaches the user as a
traceback unless ``LMCACHE_SUPERVISE_DEBUG=1``.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from supervisor.errors import EXIT_BAD_INPUT, EXIT_RUNTIME, SupervisorError

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int) -> None:
    """Print one line to stderr and exit with ``code``."""
    click.echo(f"lmcache-supervise: {message}", err=True)
    sys.exit(code)


def handles_errors(func: F) -> F:
    """Map supervisor errors (and a few OS ones) to one line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SupervisorError as exc:
            if os.environ.get("LMCACHE_SUPERVISE_DEBUG") == "1":
                raise
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except OSError as exc:
            if os.environ.get("LMCACHE_SUPERVISE_DEBUG") == "1":
                raise
            fail(f"{exc.filename or 'system'}: {exc.strerror or exc}", EXIT_RUNTIME)

    return wrapper  # type: ignore[return-value]


class _Group(click.Group):
    """A group whose usage errors exit 2 with one line, like every other bad input."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("standalone_mode", True)
        return super().main(*args, **kwargs)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lmcache-supervise")
def main() -> None:
    """Supervise Dynamo + vLLM + LMCache deployments: plan, check, up, and control them."""


# Commands are registered below, one block per command family. Keep presentation here and the
# work in the modules they call.

_ = EXIT_BAD_INPUT  # re-exported for command modules that map click errors
