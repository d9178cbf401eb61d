#!/usr/bin/env bash
# Many nodes with Open MPI, using the flags Horovod documents for NCCL clusters (docs/mpi.rst).
# Usage: launch/train_mpirun.sh -f HOSTFILE [-n NP] [-i IFACE] -- <hvd_llama.train args>
#   HOSTFILE lines look like "node1 slots=8" (see launch/hostfile.example); NP defaults to the sum of slots;
#   IFACE (e.g. eth0, ib0) pins MPI's and NCCL's TCP traffic to one network interface.
# Set DRY_RUN=1 to print the command without running it.
set -euo pipefail
hostfile="" np="" iface=""
while [ $# -gt 0 ]; do
  case "$1" in
    -f|--hostfile) hostfile=$2; shift 2 ;;
    -n|--np) np=$2; shift 2 ;;
    -i|--iface) iface=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[ -n "$hostfile" ] && [ -f "$hostfile" ] || { echo "error: -f HOSTFILE is required and must exist (got '$hostfile')" >&2; exit 2; }
[ -n "$np" ] || np=$(awk '{for (i = 1; i <= NF; i++) if ($i ~ /^slots=/) {split($i, s, "="); n += s[2]}} END {print n}' "$hostfile")
cmd=(mpirun -np "$np" -hostfile "$hostfile" -bind-to none -map-by slot
     -x NCCL_DEBUG=${NCCL_DEBUG:-WARN} -x LD_LIBRARY_PATH -x PATH -x PYTHONPATH
     -mca pml ob1 -mca btl ^openib)
if [ -n "$iface" ]; then
  cmd+=(-mca btl_tcp_if_include "$iface" -mca oob_tcp_if_include "$iface" -x NCCL_SOCKET_IFNAME="$iface")
fi
cmd+=(python -m hvd_llama.train "$@")
echo "+ ${cmd[*]}"
[ "${DRY_RUN:-0}" = 1 ] || exec "${cmd[@]}"
