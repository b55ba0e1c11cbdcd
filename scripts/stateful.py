"""The runner's stateful property test, longer than the suite's run.

    .venv/bin/python scripts/stateful.py [--examples 1000] [--steps 8]

Runs tests/engine/test_runner_stateful.py (random interleavings of start/stop/restart, concurrent
commands, child SIGKILL/SIGTERM/SIGSTOP and reloads against a real runner, invariants after every
step) with more examples and longer step sequences than `make test` keeps. Exit status is pytest's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    env = dict(os.environ)
    env["LMCACHE_SUPERVISE_STATEFUL_EXAMPLES"] = str(args.examples)
    env["LMCACHE_SUPERVISE_STATEFUL_STEPS"] = str(args.steps)
    test = "tests/engine/test_runner_stateful.py"
    argv = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "timeout=0", test]
    return subprocess.run(argv, cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
