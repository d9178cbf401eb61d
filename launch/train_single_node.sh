#!/usr/bin/env bash
# One machine, N ranks: one per GPU, or 2 on a CPU box (each rank gets cores / N threads).
# Usage: launch/train_single_node.sh [-n N] [--timeline FILE] [--autotune] -- <hvd_llama.train args>
#   e.g. launch/train_single_node.sh -n 8 -- --config configs/llama2-7b.yaml --run-dir runs/7b --resume auto
set -euo pipefail
np=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--np) np=$2; shift 2 ;;
    --timeline) extra+=(--timeline-filename "$2"); shift 2 ;;           # Horovod timeline (chrome://tracing)
    --autotune) extra+=(--autotune --autotune-log-file autotune.csv); shift ;;  # tune fusion/cycle time
    --) shift; break ;;
    -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [ -z "$np" ]; then
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  np=$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 2)
fi
cmd=(horovodrun -np "$np" -H "localhost:$np" "${extra[@]}" python -m hvd_llama.train "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
