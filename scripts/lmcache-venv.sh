#!/usr/bin/env bash
# Build .venv-lmcache: LMCache 0.5.6 with a CPU torch 2.13.0, for the tests that run LMCache's own
# servers (`lmcache server`, `lmcache_server`) under supervision. `make lmcache-venv` and `make test`
# call it; it prints the wall time and the venv's size at the end (the figures in docs/lmcache-servers.md).
# Kept apart from .venv (the supervisor never imports lmcache) and from the engines venv (no vLLM here):
# this one only needs the two server binaries and LMCache's client classes for scripts/lmcache_*_restart.py.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-lmcache}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.lmcache-installed"
want="$(cat requirements/lmcache-servers.txt scripts/lmcache-venv.sh | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    exit 0
fi
start=$(date +%s)
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --quiet)
"${pip[@]}" install --upgrade pip
# torch alone first: with it installed, lmcache's unpinned `torch` requirement resolves to it.
"${pip[@]}" install "$(grep -E '^torch==' requirements/lmcache-servers.txt)"
"${pip[@]}" install -r requirements/lmcache-servers.txt
"$VENV/bin/lmcache" --help >/dev/null 2>&1 || { echo "lmcache-venv: $VENV/bin/lmcache does not run" >&2; exit 1; }
test -x "$VENV/bin/lmcache_server" || { echo "lmcache-venv: no $VENV/bin/lmcache_server" >&2; exit 1; }
echo "$want" > "$STAMP"
end=$(date +%s)
echo "lmcache venv $VENV: built in $((end - start)) s, $(du -sh "$VENV" | cut -f1) on disk"
