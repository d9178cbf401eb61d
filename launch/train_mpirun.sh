#!/usr/bin/env bash
# Many nodes with Open MPI, using the flags Horovod documents for NCCL clusters (docs/mpi.rst).
# Usage: launch/train_mpirun.sh (-H HOSTS | -f HOSTFILE) [-n NP] [-s SLOTS] [-i IFACE] [-a AGENT] [-t SECONDS]
#                               -- <hvd_llama.train args>
#   HOSTS "node1:8,node2:8" or HOSTFILE lines "node1 slots=8" (launch/hostfile.example); inside a SLURM
#   allocation without either, its nodes with SLOTS (default: SLURM's tasks per node) ranks each.
#   NP defaults to the sum of slots. IFACE (e.g. eth0, ib0) pins MPI's and NCCL's TCP traffic to one interface,
#   the same name on every node. AGENT replaces ssh for starting Open MPI's daemons (plm_rsh_agent).
#   SECONDS: a node silent that long counts as lost and ends the job (TCP keepalive, default 60).
# Set DRY_RUN=1 to print the command without running it. As root, Open MPI wants OMPI_ALLOW_RUN_AS_ROOT=1
# and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1.
set -euo pipefail
source "$(dirname "$0")/hosts.sh"
hosts="" hostfile="" np="" slots="" iface="" agent="" timeout=60
while [ $# -gt 0 ]; do
  case "$1" in
    -H|--hosts) hosts=$2; shift 2 ;;
    -f|--hostfile) hostfile=$2; shift 2 ;;
    -n|--np) np=$2; shift 2 ;;
    -s|--slots) slots=$2; shift 2 ;;
    -i|--iface) iface=$2; shift 2 ;;
    -a|--agent) agent=$2; shift 2 ;;
    -t|--timeout) timeout=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
hosts_args "$hosts" "$hostfile" "$slots"
[ "$timeout" -gt 0 ] 2>/dev/null || die "-t $timeout: expected a number of seconds > 0"
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
[ -z "$iface" ] || export NCCL_SOCKET_IFNAME=$iface
cmd=(mpirun -np "${np:-$SLOTS}" "${HOST_ARGS[@]}" -bind-to none -map-by slot -mca pml ob1 -mca btl ^openib)
# ssh does not carry the environment: name what the ranks need, whichever is set here: the interpreter's paths,
# LD_PRELOAD (NCCL network plugins), and the knobs of Horovod, NCCL, CUDA, PyTorch, UCX and libfabric (FI_).
for name in $(compgen -e | sort); do
  case "$name" in
    PATH|PYTHONPATH|LD_LIBRARY_PATH|LD_PRELOAD|OMP_NUM_THREADS|PYTORCH_*|TORCH_*|CUDA_*|NCCL_*|UCX_*|FI_*|HOROVOD_*|\
    HVD_LLAMA_*) cmd+=(-x "$name") ;;
  esac
done
[ -z "$iface" ] || cmd+=(-mca btl_tcp_if_include "$iface" -mca oob_tcp_if_include "$iface")
[ -z "$agent" ] || cmd+=(-mca plm_rsh_agent "$agent")
# Without keepalive a dead link leaves mpirun waiting for ever: probe after timeout/2 s, 5 probes timeout/10 apart.
cmd+=(-mca oob_tcp_keepalive_time $(( (timeout + 1) / 2 )) -mca oob_tcp_keepalive_intvl $(( (timeout + 9) / 10 ))
      -mca oob_tcp_keepalive_probes 5)
cmd+=(python -m hvd_llama.train "$@")
print_command "${cmd[@]}"
[ "${DRY_RUN:-0}" = 1 ] || RELAY_USR1=1 run_supervised "${cmd[@]}"
