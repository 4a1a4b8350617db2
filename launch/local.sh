#!/usr/bin/env bash
# One host, all its local devices: bash launch/local.sh --config configs/stage3.py:shapes --workdir /tmp/qk_stage3
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m qk_jax.train "$@"
