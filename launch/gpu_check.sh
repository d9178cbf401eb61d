#!/usr/bin/env bash
# One check of a GPU node, about 5-10 minutes, for a first run on new hardware. Prints a report and exits 1 if
# any check fails (2 on bad arguments). It checks:
#   build     horovodrun --check-build lists NCCL, and doctor sees NCCL serve every collective of GPU tensors
#   small     30 steps of configs/small.yaml in bf16, fp16 and bf16 compiled: MFU, tokens/s, peak memory
#             (max_memory_allocated), the loss going down
#   resume    the bf16 run resumed from its step-20 checkpoint: steps 21-30 and the final weights compared bit
#             for bit with the uninterrupted run (and with a rerun of it, to tell GPU non-determinism apart)
#   1b        a 1B-shaped model (dim 2048, 22 layers, GQA 32/4, seq 2048) at the largest micro-batch the memory
#             planner allows with dist.zero_stage=2: 10 steps must run without running out of memory
#   np2       with 2+ GPUs: 2 ranks x batch 8 take the same steps as 1 rank x batch 16 (fp32, no TF32), and the
#             tokens/s of 2 ranks against 1 (scaling efficiency, reported)
#   stages    with 2+ GPUs: ZeRO stages 2 and 3 (bf16 weights, NCCL reduce-scatter and all-gather) within 2% of
#             stage 0's losses over 20 steps on 2 ranks, and stage 3 resumed from its step-10 checkpoint (every
#             rank's slices) equal to the uninterrupted run
# Usage: launch/gpu_check.sh [-o OUT_DIR] [-g GPUS]
#   OUT_DIR  data, runs and one log per command (default runs/gpu_check; its runs are replaced)
#   GPUS     GPUs to use (default: torch.cuda.device_count(), which honours CUDA_VISIBLE_DEVICES)
# STEP_TIMEOUT (seconds, default 600) ends a command that hangs (e.g. a collective waiting for a dead rank).
# DRY_RUN=1 prints every command instead of running it; there GPUS (default 2) and GPU_MEMORY (bytes, default
# 80 GiB) stand in for the device query, and the planner's batch is shown as <planner max batch>.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/launch/hosts.sh"  # die, print_command
out=runs/gpu_check gpus=""
while [ $# -gt 0 ]; do
  case "$1" in
    -o|--out) [ $# -ge 2 ] || die "$1 needs a value"; out=$2; shift 2 ;;
    -g|--gpus) [ $# -ge 2 ] || die "$1 needs a value"; gpus=$2; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (expected -o OUT_DIR, -g GPUS, -h)" ;;
  esac
done
cd "$REPO"
DRY=${DRY_RUN:-0}
PY=${PYTHON:-python}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 1 ]; then
  gpus=${gpus:-${GPUS:-2}} memory=${GPU_MEMORY:-$((80 << 30))}
else
  gpus=${gpus:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')} \
    || die "python cannot import torch ($PY)"
  memory=$("$PY" -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory)' 2>/dev/null) || memory=0
fi
[[ $gpus =~ ^[0-9]+$ ]] || die "-g $gpus: expected a number of GPUs"
[ "$gpus" -ge 1 ] || die "no GPU visible to torch (torch.cuda.device_count() = 0); this check needs one"
[ "$DRY" = 1 ] || { mkdir -p "$out/logs" "$out/runs" && rm -rf "${out:?}/runs/"*; } || die "cannot write to $out"

REPORT=() FAILED=()
report() { REPORT+=("$*"); echo "[gpu_check] $*"; }
fail() { FAILED+=("$1"); report "FAIL $*"; }
# step NAME CMD...: print the command, run it with its output in $out/logs/NAME.log; 1 on failure (recorded).
step() {
  local name=$1; shift
  print_command "$@"
  [ "$DRY" = 1 ] && return 0
  timeout "${STEP_TIMEOUT:-600}" "$@" >"$out/logs/$name.log" 2>&1 && return 0
  fail "$name: exit $? (124: over STEP_TIMEOUT=${STEP_TIMEOUT:-600} s; last lines of $out/logs/$name.log:)"
  tail -5 "$out/logs/$name.log" | sed 's/^/    /'
  return 1
}
# check NAME WHAT CHECK PATH: launch/gpu_check.py's CHECK of what the commands wrote at PATH; its line goes to
# the report, its failure to the failures. Printed, not run, in a dry run.
check() {
  local name=$1 what=$2 line
  if [ "$DRY" = 1 ]; then echo "# check $name: $what (launch/gpu_check.py $3 $4)"; return 0; fi
  if line=$("$PY" "$REPO/launch/gpu_check.py" "$3" "$4" 2>&1); then report "ok   $name: $line"
  else fail "$name: $line"; fi
}
train() {  # train NAME [LAUNCHER...] -- OVERRIDES...: hvd_llama.train on the check's data
  local name=$1 launcher=(); shift
  while [ "$1" != -- ]; do launcher+=("$1"); shift; done; shift
  step "$name" "${launcher[@]}" "$PY" -m hvd_llama.train --config configs/small.yaml --run-dir "$out/runs/$name" \
    --set "data.dir=$out/data" --set train.device=cuda --set train.eval_every=0 --set log.every=10 "$@"
}

echo "== build: Horovod with NCCL; doctor"
if [ "$DRY" = 1 ]; then print_command horovodrun --check-build
elif horovodrun --check-build 2>&1 | grep -q '\[X\] NCCL'; then report "ok   build: horovodrun --check-build lists NCCL"
else fail "build: horovodrun --check-build does not list [X] NCCL (rebuild: launch/install.sh --cuda)"; fi
np_doctor=$((gpus >= 2 ? 2 : 1))
step doctor horovodrun -np "$np_doctor" -H "localhost:$np_doctor" "$PY" -m hvd_llama.doctor --precision bf16 \
  --json "$out/doctor.json" && check doctor "every collective of CUDA tensors served by NCCL" doctor "$out/doctor.json"

echo "== data"
step prepare "$PY" -m hvd_llama.prepare --input stdlib --out "$out/data" --overwrite \
  || { echo "[gpu_check] cannot continue without data"; exit 1; }

echo "== small: 30 steps in bf16, fp16, bf16 compiled"
for run in bf16 fp16 compiled; do
  precision=$([ "$run" = fp16 ] && echo fp16 || echo bf16)
  train "$run" -- --set train.max_steps=30 --set checkpoint.every=20 --set "train.precision=$precision" \
    --set "train.compile=$([ "$run" = compiled ] && echo true || echo false)" \
    && check "$run" "loss down, MFU <= 100%, peak memory logged" run "$out/runs/$run"
done

echo "== resume after step 20, bit for bit"
train bf16_again -- --set train.max_steps=30 --set checkpoint.every=20 --set train.precision=bf16
train bf16_resumed -- --set train.max_steps=30 --set checkpoint.every=20 --set train.precision=bf16 \
  --resume "$out/runs/bf16/checkpoints/step_00000020"
check resume "steps 21-30 and final weights: resumed vs uninterrupted (a rerun shows GPU non-determinism)" \
  resume "$out/runs"

echo "== 1B-shaped model at the planner's largest batch (dist.zero_stage=2)"
ONE_B=(--set model.dim=2048 --set model.n_layers=22 --set model.n_heads=32 --set model.n_kv_heads=4
       --set model.multiple_of=256 --set model.max_seq_len=2048 --set train.seq_len=2048 --set dist.zero_stage=2
       --set train.precision=bf16)
if [ "$DRY" = 1 ]; then
  print_command "$PY" -m hvd_llama.plan --config configs/small.yaml "${ONE_B[@]}" --set train.batch_size=1 \
    --device-memory "$memory" --json
  batch="<planner max batch>"
else
  batch=$("$PY" -m hvd_llama.plan --config configs/small.yaml "${ONE_B[@]}" --set train.batch_size=1 \
    --device-memory "$memory" --json 2>"$out/logs/plan.log" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["max_batch_size"])') \
    || batch=0
  report "info 1b: the planner allows micro-batch $batch in $((memory >> 30)) GiB"
fi
if [ "$batch" = 0 ]; then fail "1b: the planner finds no batch that fits (see $out/logs/plan.log)"
else
  train 1b -- "${ONE_B[@]}" --set "train.batch_size=$batch" --set train.max_steps=10 --set checkpoint.every=0 \
    --set optim.warmup_steps=2 && check 1b "10 steps without running out of memory" run "$out/runs/1b"
fi

if [ "$gpus" -ge 2 ]; then
  echo "== 2 GPUs: equivalence and scaling"
  EXACT=(--set train.max_steps=10 --set checkpoint.every=0 --set train.precision=fp32 --set train.tf32=false
         --set optim.warmup_steps=2)
  train np1_b16 -- "${EXACT[@]}" --set train.batch_size=16
  train np2_b8 horovodrun -np 2 -H localhost:2 -- "${EXACT[@]}" --set train.batch_size=8
  train np2_b16 horovodrun -np 2 -H localhost:2 -- "${EXACT[@]}" --set train.batch_size=16
  check np2 "2 ranks x 8 = 1 rank x 16 step by step; scaling of 2 ranks x 16 against 1" np2 "$out/runs"
  echo "== 2 GPUs: ZeRO stages 2 and 3 against stage 0, bf16; a stage-3 resume"
  STAGES=(--set train.max_steps=20 --set checkpoint.every=10 --set checkpoint.keep=0 --set train.precision=bf16
          --set train.batch_size=8 --set optim.warmup_steps=2)
  for stage in 0 2 3; do
    train "zero$stage" horovodrun -np 2 -H localhost:2 -- "${STAGES[@]}" --set "dist.zero_stage=$stage"
  done
  train zero3_resumed horovodrun -np 2 -H localhost:2 -- "${STAGES[@]}" --set dist.zero_stage=3 \
    --resume "$out/runs/zero3/checkpoints/step_00000010"
  check stages "bf16 stages 2 and 3 within 2% of stage 0; stage 3 resumed from step 10 = uninterrupted" \
    stages "$out/runs"
else
  report "skip np2, stages: 1 GPU (the 2-rank checks need 2)"
fi

echo
echo "== report ($out)"
printf '%s\n' "${REPORT[@]}"
if [ "$DRY" = 1 ]; then echo "dry run: nothing was run"; exit 0; fi
if [ ${#FAILED[@]} -gt 0 ]; then echo "gpu_check: ${#FAILED[@]} check(s) FAILED"; exit 1; fi
echo "gpu_check: all checks passed"
