"""Stage 4, the engine: run a plan and keep it running.

``states`` (process and deployment lifecycles, each one transition table), ``runner`` (one task per
process, dependency gates, restarts, ordered stop), ``process`` (one OS child: spawn, group signals,
the guardian), ``proctree`` (the one process-tree walk), ``probes``/``probe_http`` (health checks),
``discovery`` (forget a dead worker in file discovery), ``logs`` (child output to rotating files),
``pidfile`` and ``foreground`` (signals, pid file, services around a runner).
May import: host (the NVML wrapper for GPU hygiene), plan and below.
"""
