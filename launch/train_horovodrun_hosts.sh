#!/usr/bin/env bash
# Many nodes with horovodrun over ssh and Gloo (no MPI needed): horovodrun starts every rank with ssh,
# after checking that it can reach each node without a password.
# Usage: launch/train_horovodrun_hosts.sh (-H HOSTS | -f HOSTFILE) [-n NP] [-s SLOTS] [-i IFACE] [-t SECONDS]
#                                         [-p SSH_PORT] [-k SSH_KEY] -- <hvd_llama.train args>
#   HOSTS "node1:8,node2:8" or HOSTFILE lines "node1 slots=8"; inside a SLURM allocation without either, its
#   nodes with SLOTS (default: SLURM's tasks per node) ranks each. NP defaults to the sum of slots.
#   IFACE (e.g. eth0) is the interface Horovod and NCCL use, the same name on every node.
#   SECONDS: a collective waiting that long for another rank fails the job (Gloo timeout, default 60).
#   SSH_PORT and SSH_KEY are passed to ssh (default: your ssh configuration).
# Set DRY_RUN=1 to print the command without running it.
set -euo pipefail
source "$(dirname "$0")/hosts.sh"
hosts="" hostfile="" np="" slots="" iface="" timeout=60 ssh_port="" ssh_key=""
while [ $# -gt 0 ]; do
  case "$1" in
    -H|--hosts) hosts=$2; shift 2 ;;
    -f|--hostfile) hostfile=$2; shift 2 ;;
    -n|--np) np=$2; shift 2 ;;
    -s|--slots) slots=$2; shift 2 ;;
    -i|--iface) iface=$2; shift 2 ;;
    -t|--timeout) timeout=$2; shift 2 ;;
    -p|--ssh-port) ssh_port=$2; shift 2 ;;
    -k|--ssh-key) ssh_key=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
hosts_args "$hosts" "$hostfile" "$slots"
[ "$timeout" -gt 0 ] 2>/dev/null || die "-t $timeout: expected a number of seconds > 0"
# --gloo: with an MPI-enabled Horovod, horovodrun would otherwise hand the job to mpirun.
cmd=(horovodrun --gloo -np "${np:-$SLOTS}" "${HOST_ARGS[@]}" --gloo-timeout-seconds "$timeout")
[ -z "$iface" ] || cmd+=(--network-interfaces "$iface")
[ -z "$ssh_port" ] || cmd+=(--ssh-port "$ssh_port")
[ -z "$ssh_key" ] || cmd+=(--ssh-identity-file "$ssh_key")
cmd+=(python -m hvd_llama.train "$@")
print_command "${cmd[@]}"
[ "${DRY_RUN:-0}" = 1 ] || run_supervised "${cmd[@]}"
