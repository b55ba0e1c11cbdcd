"""Stage 2, the plan: the pure ``render(profile) -> Plan``, byte for byte the same for the same profile.

``spec`` (the frozen Plan/ProcessSpec types), ``render`` (argv, env, GPUs, ports, gates per process,
in order), ``infra`` (etcd/NATS and cluster roles), ``nodes`` (which part of a plan a machine runs),
``addresses`` (the one home for wildcard, loopback and IPv6 URL rules) and ``policies`` (probe,
restart and start-up budgets). No IO. May import: profile and below.
"""
