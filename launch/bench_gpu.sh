#!/bin/bash
# The GPU figures of the README's performance table: python -m qk_jax.bench on one GPU, JAX beside diffusers +
# torch.compile, then the layer-scan / remat / XLA-flag variants, guided sampling and the 7B VLM forward.
#   bash launch/bench_gpu.sh [OUT_DIR]   (BATCH=8 by default; JSON lines go to OUT_DIR/bench.jsonl)
set -u
out=${1:-${OUT:-/tmp/qk_bench}}
mkdir -p "$out"
batch=${BATCH:-8}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
shape=(--config configs/stage2.py:bench --batch "$batch" --image-tokens 1024 --text-tokens 256 --steps 10)

bench() {  # one process per variant; the full log in bench.log, the measurements in bench.jsonl
  echo "== $*" | tee -a "$out/bench.log"
  timeout "${LIMIT:-240}" python3 -m qk_jax.bench "$@" >>"$out/bench.log" 2>&1
  echo "rc=$?" >>"$out/bench.log"
  grep '^{' "$out/bench.log" | tail -n +$(( $(cat "$out/bench.jsonl" 2>/dev/null | wc -l) + 1 )) | tee -a "$out/bench.jsonl"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())" | tee -a "$out/device.txt"

# The target: the 1.4B MMDiT training step, JAX (no remat) and diffusers + torch.compile, on the same batch.
# JAX allocates as it goes (no preallocation, above) so that torch finds room in the same process.
bench "${shape[@]}" --what mmdit_train --torch
bench "${shape[@]}" --what mmdit_train --scan-layers
bench "${shape[@]}" --what mmdit_train --remat attention
XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false" \
  bench "${shape[@]}" --what mmdit_train
bench "${shape[@]}" --what sample --torch
bench --config configs/stage2.py --what vlm_forward --batch 4 --text-tokens 512 --steps 5
