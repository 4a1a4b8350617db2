#!/usr/bin/env bash
# Run the same command on every worker of a Cloud TPU VM pod slice (one process per host):
#   TPU_NAME=qk-v5p-256 ZONE=us-east5-a bash launch/tpu_pod.sh --config configs/stage2.py --workdir gs://bucket/qk_stage2
# QK_JAX_DISTRIBUTED=1 makes every worker join the slice's jax.distributed job (qk_jax.parallel.distributed).
# Assumes the repository is checked out at the same path on every worker and installed with `pip install -e '.[tpu]'`.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd $REPO && QK_JAX_DISTRIBUTED=1 python -m qk_jax.train $(printf '%q ' "$@")"
