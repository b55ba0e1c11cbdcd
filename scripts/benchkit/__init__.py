"""The parts of ``scripts/bench.py``: one module per measurement, plus what they share.

Every measurement runs the supervisor in a process of its own (:mod:`benchkit.driver`), so that
the RSS and CPU it reports belong to the supervisor alone, and reads its state changes as JSON
lines. Children report their own instants (start, health flip, exit) through a FIFO, so "the new
process runs" is what the new process itself says, not what the supervisor believes.
"""
