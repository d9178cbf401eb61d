#!/usr/bin/env bash
# One machine, N ranks: one per GPU torch can use, or 2 on a CPU box (each rank gets cores / N threads).
# Usage: launch/train_single_node.sh [-n N] [--timeline FILE] [--autotune] -- <hvd_llama.train args>
#   e.g. launch/train_single_node.sh -n 8 -- --config configs/llama2-7b.yaml --run-dir runs/7b --resume auto
# Set DRY_RUN=1 to print the command without running it.
set -euo pipefail
source "$(dirname "$0")/hosts.sh"
np=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--np) np=$2; shift 2 ;;
    --timeline) extra+=(--timeline-filename "$2"); shift 2 ;;           # Horovod timeline (chrome://tracing)
    --autotune) extra+=(--autotune --autotune-log-file autotune.csv); shift ;;  # tune fusion/cycle time
    --) shift; break ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [ -z "$np" ]; then
  # The GPUs the ranks can use: torch honours CUDA_VISIBLE_DEVICES and MIG (nvidia-smi -L lists every device).
  gpus=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null) || gpus=0
  np=$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 2)
fi
cmd=(horovodrun -np "$np" -H "localhost:$np" "${extra[@]}" python -m hvd_llama.train "$@")
print_command "${cmd[@]}"
[ "${DRY_RUN:-0}" = 1 ] || run_supervised "${cmd[@]}"
