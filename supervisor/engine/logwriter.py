"""Child log files written off the event loop: one thread, one bounded queue, drops counted.

A child's output used to be written to its log file by the event loop itself: a stalled log
filesystem (a hung NFS mount, a FUSE daemon that stopped answering, a file that is a FIFO nobody
reads) stalled supervision with it, and then the systemd watchdog killed the service. Now the loop
only appends to a queue; one writer thread does the ``open``/``write``/rotation. The queue holds
at most :data:`QUEUE_BYTES`; beyond that a chunk is dropped and counted on its output, which
reports the start and the end of each dropping spell once. A stalled disk costs log lines, never
supervision. One thread serves every file: they share a directory, so a stall is rarely one file's.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Protocol

#: What may wait in memory for a slow disk, across all children (a 50 MB/s flood fills it in 0.3 s).
QUEUE_BYTES = 16 * 1024 * 1024


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


class Writer:
    """The one writer thread (started on first use; a daemon: it never holds the process up)."""

    def __init__(self, capacity: int = QUEUE_BYTES) -> None:
        self.capacity = capacity
        self._items: deque[tuple[Sink, bytes | None]] = deque()
        self._queued = 0
        self._busy = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def put(self, sink: Sink, data: bytes) -> bool:
        """Queue ``data`` for ``sink``; False (nothing queued) when the queue is full."""
        with self._cond:
            if self._queued + len(data) > self.capacity:
                return False
            self._items.append((sink, data))
            self._queued += len(data)
            self._start()
            self._cond.notify()
        return True

    def close(self, sink: Sink) -> None:
        """Close ``sink`` once everything queued before for it is written (never refused)."""
        with self._cond:
            self._items.append((sink, None))
            self._start()
            self._cond.notify()

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued so far is written; False if that took over ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._items or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="child-log-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    self._busy = False
                    self._cond.notify_all()  # flush() waiters
                    self._cond.wait()
                sink, data = self._items.popleft()
                self._busy = True
            try:
                if data is None:
                    sink.close()
                else:
                    sink.write(data)  # RotatingFile never raises; a stall blocks only this thread
            finally:
                if data is not None:
                    with self._cond:
                        self._queued -= len(data)


#: The process's writer: every ChildOutput queues here.
WRITER = Writer()
