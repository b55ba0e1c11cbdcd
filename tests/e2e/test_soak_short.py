"""The fault soak, short: 30 s of random SIGKILL / SIGSTOP+SIGCONT on the real demo under a steady
client (``scripts/soak.py --duration 30 --gap 2 5``; the 5-minute run is ``make soak``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import soak

pytestmark = pytest.mark.e2e
SEED = 20261128


def test_short_soak(tmp_path: Path) -> None:
    figures = soak.run_soak(duration_s=30.0, seed=SEED, gap_s=(2.0, 5.0), workdir=tmp_path)
    soak.print_figures(figures)  # shown by pytest on failure
    assert figures["problems"] == [] and figures["ok"]
    faults = figures["faults"]
    assert faults["total"] >= 5 and sum(faults["SIGKILL"].values()) >= 1, faults
    assert figures["requests"]["sent"] >= 100
    assert figures["requests"]["failed_outside_windows"] == 0
    assert all(c["observed"] == c["expected"] for c in figures["restarts"].values()), figures["restarts"]
    assert sum(c["observed"] for c in figures["restarts"].values()) >= 1
    assert figures["supervisor"]["fd_drift"] <= 0
    assert figures["supervisor"]["rss_drift_mib"] <= soak.RSS_DRIFT_LIMIT_MIB
    assert figures["orphans"] == 0 and figures["stale_multiproc_dirs"] == 0
    assert figures["ready_at_end"] and figures["exit_code"] == 0
