# Sourced by the launchers (train_mpirun.sh, train_horovodrun_hosts.sh; train_single_node.sh for print_command);
# not run by itself.
# Where the hosts come from, in this order: -H "node1:8,node2:8"; -f HOSTFILE with lines "node1 slots=8";
# inside a SLURM allocation, `scontrol show hostnames "$SLURM_JOB_NODELIST"` with one rank per task
# (SLURM_NTASKS_PER_NODE) or -s SLOTS per node.

die() { echo "error: $*" >&2; exit 2; }

# hosts_args HOSTS HOSTFILE SLOTS_PER_NODE: sets HOST_ARGS (the launcher's -H/-hostfile flag) and SLOTS (their sum).
hosts_args() {
  local hosts=$1 hostfile=$2 per_node=$3
  if [ -n "$hosts" ]; then
    HOST_ARGS=(-H "$hosts")
    SLOTS=$(tr ',' '\n' <<<"$hosts" | awk -F: '{n += (NF > 1 ? $2 : 1)} END {print n}')
  elif [ -n "$hostfile" ]; then
    [ -f "$hostfile" ] || die "-f $hostfile: no such hostfile"
    HOST_ARGS=(-hostfile "$hostfile")
    SLOTS=$(awk '!/^[[:space:]]*(#|$)/ {s = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) s = substr($i, 7); n += s}
                 END {print n + 0}' "$hostfile")
  elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    per_node=${per_node:-${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}}
    per_node=${per_node%%(*}  # SLURM writes "8(x2)" for two nodes of 8
    hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/:$per_node/" | paste -sd,)
    [ -n "$hosts" ] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' listed no nodes"
    hosts_args "$hosts" "" ""
    return
  else
    die "no hosts: give -H node1:8,node2:8, -f HOSTFILE, or run inside a SLURM allocation"
  fi
  [ "$SLOTS" -gt 0 ] 2>/dev/null || die "no slots in the host list (got '${hosts:-$hostfile}')"
}

# print_command ARGS...: the exact command, quoted where a shell needs it, so that it can be pasted.
print_command() {
  local arg line="+" escaped_quote="'\\''"
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then line+=" $arg"; else line+=" '${arg//\'/$escaped_quote}'"; fi
  done
  echo "$line"
}
