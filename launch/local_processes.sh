#!/usr/bin/env bash
# N CPU processes on this machine joined as one job (jax.distributed over gloo), D fake devices each: the pod path
# without a pod, for tests and for trying a mesh.
#   bash launch/local_processes.sh 2 4 --config configs/stage1.py:tiny --workdir /tmp/qk_mp
# Process i logs to <workdir>.process<i>.log (a gs:// workdir: $LOG_DIR/<its last part>.process<i>.log, LOG_DIR
# defaulting to ./logs); the exit status is the first failing process's, else 0.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:?give the number of processes}; D=${2:?give the devices per process}; shift 2
workdir=""
for arg in "$@"; do case "$arg" in --workdir=*) workdir=${arg#--workdir=};; esac; done
prev=""
for arg in "$@"; do [ "$prev" = "--workdir" ] && workdir=$arg; prev=$arg; done
: "${workdir:?give --workdir}"
case "$workdir" in
  *://*) log=${LOG_DIR:-logs}/$(basename "$workdir");;  # a bucket: the logs stay on this machine
  *) log=$workdir;;
esac
mkdir -p "$(dirname "$log")"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$D" JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" \
    JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i" python -m qk_jax.train "$@" >"$log.process$i.log" 2>&1 &
  pids+=($!)
done
# SIGTERM / Ctrl-C reach every process, as a scheduler's would: each saves the same step and exits 0.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
status=0
for pid in "${pids[@]}"; do
  while :; do
    code=0; wait "$pid" || code=$?
    kill -0 "$pid" 2>/dev/null || break  # else a forwarded signal interrupted the wait: wait again
  done
  [ "$status" -eq 0 ] && status=$code
done
exit "$status"
