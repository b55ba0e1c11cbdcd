"""Stage 3a, the host: the only code that looks at the machine, gathered once into frozen facts.

``facts`` (what a plan needs probed: CPU, RAM, disk, ports, model), ``gpu`` (GPU facts),
``nvml`` (the one NVML wrapper), ``redis`` (remote cache reachability), ``software`` (the worker
interpreter's modules, etcd/nats-server binaries). May import: plan and below (for types).
"""
