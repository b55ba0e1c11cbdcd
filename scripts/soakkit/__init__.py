"""The parts of ``scripts/soak.py``: a real ``up demo`` driven from outside, a client, a fault injector.

The deployment itself is run by the shared harness (``scripts/harness.py``, also used by the e2e tests
and the benchmarks); :mod:`soakkit.faults` sends requests and faults and :mod:`soakkit.judge` judges
the outcome. The short soak in ``tests/e2e/test_soak_short.py`` uses the same parts.
"""
