#!/bin/bash
# The upstream script with its fixed `sleep 20` replaced by the usual improvement: poll decode's
# health endpoint with curl once a second until it answers 200. Everything else as in
# disagg_lmcache.sh (same launch file, same `kill 0`).
#
# Usage: disagg_lmcache_poll.sh LAUNCH_FILE   (also defines DECODE_HEALTH_URL)
set -e
trap 'echo Cleaning up...; kill 0' EXIT

# shellcheck source=/dev/null
source "$1"

# run ingress
"${FRONTEND[@]}" &

# run decode worker
"${DECODE[@]}" &

# wait for decode worker to report healthy
until curl -sf -o /dev/null "$DECODE_HEALTH_URL"; do
    sleep 1
done

# run prefill worker
"${PREFILL[@]}"
