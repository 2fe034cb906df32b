#!/usr/bin/env bash
# Create (or update) .venv-peers, the separate virtual environment of the peer quantizers
# (llm-compressor, HQQ, bitsandbytes, AutoRound) that bench/quantize_reference.py drives through
# bench/peers/run_peer.py. Idempotent: does nothing when the venv is installed from the current
# requirements.txt. Usage: bash bench/peers/setup.sh   (or: make peers-setup)
#
# torch is installed first and pinned (torch==2.13.0), so that on a CPU machine with a local CPU
# wheel pip takes it instead of a multi-GB CUDA build; elsewhere point pip at PyTorch's CPU wheel
# index with TORCH_ARGS="--index-url <PyTorch CPU index URL>".
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON="${PYTHON:-python3}"
VENV="${PEERS_VENV:-.venv-peers}"
TORCH="${TORCH:-torch==2.13.0}"
TORCH_ARGS="${TORCH_ARGS:-}"
REQ=bench/peers/requirements.txt
STAMP="$VENV/.peers-installed"
PIP=(-m pip install --quiet --disable-pip-version-check)

if [ -f "$STAMP" ] && cmp -s "$REQ" "$STAMP"; then
    echo "$VENV is up to date"
    exit 0
fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC2086  # TORCH_ARGS is a list of pip arguments
"$VENV/bin/python" "${PIP[@]}" "$TORCH" $TORCH_ARGS
"$VENV/bin/python" "${PIP[@]}" -r "$REQ"  # torch is already there, so the pin is satisfied
if ! out=$("$VENV/bin/python" -c "import auto_round, bitsandbytes, hqq, llmcompressor, torch; print('torch', torch.__version__)" 2>&1); then
    echo "$out" >&2
    exit 1
fi
echo "$out" | tail -n 1
cp "$REQ" "$STAMP"
echo "$VENV ready"
