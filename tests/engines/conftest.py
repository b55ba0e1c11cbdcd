"""The engine tier: the released Dynamo, vLLM, LMCache, kvbm and NIXL judge what the supervisor emits.

It needs the engines venv (scripts/engines-venv.sh, several GB), so it runs only under
``make test-engines``, which builds that venv and sets ``LMCACHE_SUPERVISE_ENGINES_PYTHON``; the
plain suite does not collect this directory (tests/conftest.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINES_PYTHON = os.environ.get(
    "LMCACHE_SUPERVISE_ENGINES_PYTHON", str(ROOT / ".venv-engines" / "bin" / "python")
)


@pytest.fixture(scope="session")
def engines_python() -> str:
    if not os.access(ENGINES_PYTHON, os.X_OK):
        pytest.fail(
            f"no engines venv at {ENGINES_PYTHON}: run `make test-engines` (scripts/engines-venv.sh builds it)"
        )
    return ENGINES_PYTHON
