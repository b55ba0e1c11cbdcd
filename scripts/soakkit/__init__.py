"""The parts of ``scripts/soak.py``: a real ``up demo`` driven from outside, a client, a fault injector.

:mod:`soakkit.deployment` runs ``lmcache-supervise up demo`` in a process of its own and reads its
structured events as they arrive (stamped with this process's ``time.monotonic()`` on arrival);
:mod:`soakkit.faults` sends requests and faults and judges the outcome. The short soak in
``tests/e2e/test_soak_short.py`` and the security/resource e2e tests use the same driver.
"""
