#!/bin/bash
# The GPU figures of docs/performance.md's table: python -m qk_jax.bench on one GPU, JAX beside diffusers +
# torch.compile (with a kernel profile of the JAX step), a doubled batch, the layer-scan / remat / XLA-flag
# variants, guided sampling and the 7B VLM forward.
#   bash launch/bench_gpu.sh [OUT_DIR] [PARTS]   PARTS: any of "jax batch eager torch fp8 variants sample vlm"
#   (default: "torch batch fp8 variants sample vlm"; torch = JAX beside diffusers + torch.compile, eager = without
#   torch.compile, fp8 = the JAX step with config.fp8 at both batch sizes: its fp8_gemms field counts the
#   cuBLASLt fp8 GEMMs XLA made, 0 if the pattern was not matched)
# BATCH=8 by default. JSON lines go to OUT_DIR/bench.jsonl, everything to OUT_DIR/bench.log, each profile's Chrome
# trace to OUT_DIR/trace_<what>_<n>.json.gz (open in ui.perfetto.dev).
set -u
out=${1:-${OUT:-/tmp/qk_bench}}
parts=${2:-torch batch fp8 variants sample vlm}
mkdir -p "$out"
batch=${BATCH:-8}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
shape=(--config configs/stage2.py:bench --image-tokens 1024 --text-tokens 256 --steps 10)
n=0

bench() {  # one process per variant; the full log in bench.log, the measurements in bench.jsonl
  n=$((n + 1))
  echo "== $*" | tee -a "$out/bench.log"
  timeout "${LIMIT:-240}" python3 -m qk_jax.bench "$@" --profile "$out/prof$n" >>"$out/bench.log" 2>&1
  echo "rc=$?" >>"$out/bench.log"
  grep '^{' "$out/bench.log" | tail -n +$(( $(cat "$out/bench.jsonl" 2>/dev/null | wc -l) + 1 )) | tee -a "$out/bench.jsonl"
  for dir in "$out/prof$n"/*/; do  # one per --what; flat names: $OUT keeps two levels
    cp "$dir"plugins/profile/*/*.trace.json.gz "$out/trace_$(basename "$dir")_$n.json.gz" 2>/dev/null
  done
  rm -rf "$out/prof$n"
}
has() { [[ " $parts " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/device.txt"
python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())" | tee -a "$out/device.txt"

# The target: the 1.4B MMDiT training step, diffusers + torch.compile then JAX (no remat), on the same batch.
# torch.compile's first step took 63 s on an H100 (2026-11-27); the parts without it give figures sooner.
has jax && bench "${shape[@]}" --batch "$batch" --what mmdit_train
has batch && bench "${shape[@]}" --batch $((2 * batch)) --what mmdit_train
has eager && bench "${shape[@]}" --batch "$batch" --what mmdit_train --torch --notorch-compile
has torch && LIMIT=${TORCH_LIMIT:-600} bench "${shape[@]}" --batch "$batch" --what mmdit_train --torch
if has fp8; then
  bench "${shape[@]}" --batch "$batch" --what mmdit_train --config.fp8=True
  bench "${shape[@]}" --batch $((2 * batch)) --what mmdit_train --config.fp8=True
fi
if has variants; then
  XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false" \
    bench "${shape[@]}" --batch "$batch" --what mmdit_train
  bench "${shape[@]}" --batch "$batch" --what mmdit_train --scan-layers
  bench "${shape[@]}" --batch "$batch" --what mmdit_train --remat attention
fi
has sample && bench "${shape[@]}" --batch "$batch" --what sample --torch
has vlm && bench --config configs/stage2.py --what vlm_forward --batch 4 --text-tokens 512 --steps 5
exit 0
