#!/usr/bin/env bash
# Build the engines venv: a worker interpreter with the released Dynamo, vLLM, LMCache, KVBM and NIXL,
# by the README's own install lines ("Installing the engines"), so `make test-engines` checks exactly
# what a user gets. `make engines-venv` and `make test-engines` call it; so can a GPU server:
#   scripts/engines-venv.sh /opt/engines        then   python = "/opt/engines/bin/python"
# It prints the wall time and the venv's size at the end (the README's figures come from here).
#
# Steps, each for a reason:
# 1. torch==2.13.0 first: on this project's CPU machines pip takes a CPU build from local disk; on a GPU
#    server it is PyPI's CUDA build. The next resolve keeps it (vllm 0.31.0 pins 2.13.0).
# 2. '.[gpu]': the `gpu` extra (pyproject.toml), one resolve: ai-dynamo's requirements, its vllm extra,
#    lmcache. The supervisor comes along (what `pip install 'lmcache-supervise[gpu]'` does).
# 3. ai-dynamo and kvbm with --no-deps: ai-dynamo's `aisimulate` is a placeholder on PyPI; kvbm pins
#    nixl==1.3.2 against ai-dynamo's nixl==1.4.1 (pyproject.toml says more).
# 4. On a machine without CUDA only: PyPI's torchvision/torchaudio/torchcodec are built for CUDA torch
#    and break `import vllm` beside a CPU torch ("operator torchvision::nms does not exist"); no worker
#    code path the supervisor emits needs them, so they are removed there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-engines}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.engines-installed"
want="$(cat pyproject.toml scripts/engines-venv.sh | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    echo "engines venv $VENV is up to date"
    exit 0
fi
start=$(date +%s)
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --quiet)
"${pip[@]}" install --upgrade pip
"${pip[@]}" install torch==2.13.0
"${pip[@]}" install '.[gpu]'
"${pip[@]}" install --no-deps ai-dynamo==1.6.1 kvbm==1.6.1
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)'; then
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec
fi
# Reports aisimulate, kvbm's nixl==1.3.2 and (CPU only) the removed torchvision: expected, see above.
"$VENV/bin/python" -m pip check || true
echo "$want" > "$STAMP"
end=$(date +%s)
echo "engines venv $VENV: built in $((end - start)) s, $(du -sh "$VENV" | cut -f1) on disk"
