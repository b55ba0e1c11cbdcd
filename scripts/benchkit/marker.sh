#!/usr/bin/env bash
# A bench child: the moment it runs, it writes "TAG PID WALL" into the bench's FIFO, then idles as
# `sleep` (exec: same pid, nothing left of bash). Bash, not Python: it starts in ~2 ms, so "the new
# process runs" is not hidden behind an interpreter's start-up. Usage: marker.sh FIFO TAG [CMD...]
# (with CMD, it becomes CMD instead of sleep: the log-flood bench's victim floods too).
LC_ALL=C  # $EPOCHREALTIME with a decimal point, whatever the locale
printf '%s %s %s\n' "$2" "$$" "$EPOCHREALTIME" > "$1"
if [ $# -gt 2 ]; then
  shift 2
  exec "$@"
fi
exec sleep infinity
