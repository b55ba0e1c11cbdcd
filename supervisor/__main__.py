"""``python -m supervisor`` is the ``lmcache-supervise`` command."""

from supervisor.cli import main

main()
