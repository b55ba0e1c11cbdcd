#!/bin/bash
# The upstream way, for the benchmark (scripts/bench.py): Dynamo's examples/backends/vllm/launch/
# disagg_lmcache.sh, statement for statement: frontend in the background, decode in the
# background, a fixed `sleep 20` "to let decode initialize", prefill in the foreground, and
# `kill 0` on exit. The commands are the ones `lmcache-supervise plan` renders for the same
# profile (same argv, same env), given as bash arrays in the file named by $1, so that the only
# difference from the supervisor is how the three processes are sequenced.
#
# Usage: disagg_lmcache.sh LAUNCH_FILE   (defines FRONTEND, DECODE, PREFILL arrays; see bench)
set -e
trap 'echo Cleaning up...; kill 0' EXIT

# shellcheck source=/dev/null
source "$1"

# run ingress
"${FRONTEND[@]}" &

# run decode worker
"${DECODE[@]}" &

# wait for decode worker to initialize
sleep 20

# run prefill worker
"${PREFILL[@]}"
