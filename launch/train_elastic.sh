#!/usr/bin/env bash
# Elastic training: the job keeps running while workers come and go, between MIN and MAX ranks.
# Usage: launch/train_elastic.sh [-n NP] [--min-np MIN] [--max-np MAX] [-d DISCOVERY_SCRIPT] [-i IFACE]
#                               [--cooldown MIN_S MAX_S] -- <train args>
#   e.g. echo localhost:3 > launch/hosts.txt
#        launch/train_elastic.sh -n 3 --min-np 2 --max-np 3 -i lo -- --config configs/tiny.yaml --run-dir runs/el
# State (model, optimizer, data position, step) is committed every dist.commit_every steps; a lost worker
# rolls the others back to the last commit, and the learning rate follows the world size (linear scaling).
# Horovod blacklists the host of a worker that failed; --cooldown lets it back after MIN_S..MAX_S seconds
# (longer at each failure) if the discovery script still lists it (horovodrun --blacklist-cooldown-range).
set -euo pipefail
source "$(dirname "$0")/hosts.sh"
np=2 min_np=1 max_np="" iface=() cooldown=()
discovery="$(cd "$(dirname "$0")" && pwd)/discover_hosts.sh"
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--np) np=$2; shift 2 ;;
    --min-np) min_np=$2; shift 2 ;;
    --max-np) max_np=$2; shift 2 ;;
    -d|--discovery) discovery=$2; shift 2 ;;
    -i|--iface) iface=(--network-interfaces "$2"); shift 2 ;;  # e.g. lo when every worker is local
    --cooldown) cooldown=(--blacklist-cooldown-range "$2" "$3"); shift 3 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
cmd=(horovodrun -np "$np" --min-np "$min_np" ${max_np:+--max-np "$max_np"} "${iface[@]}" "${cooldown[@]}" --host-discovery-script "$discovery"
     python -m hvd_llama.train --elastic "$@")
print_command "${cmd[@]}"
[ "${DRY_RUN:-0}" = 1 ] || exec "${cmd[@]}"
