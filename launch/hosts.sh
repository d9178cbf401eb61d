# Sourced by the launchers (train_mpirun.sh, train_horovodrun_hosts.sh; train_single_node.sh and train_elastic.sh
# for print_command); not run by itself.
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
    local given="-s $per_node" name
    if [ -z "$per_node" ]; then
      for name in SLURM_NTASKS_PER_NODE SLURM_TASKS_PER_NODE; do [ -z "${!name:-}" ] || break; done
      per_node=${!name:-1} given="$name=${!name:-}"
    fi
    per_node=${per_node%%(*}  # SLURM writes "8(x2)" for two nodes of 8
    # Digits only: the value becomes part of a sed program, and of the host list the launcher parses.
    [[ $per_node =~ ^[1-9][0-9]*$ ]] || die "$given: expected a whole number of ranks per node > 0, such as -s 8"
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

# run_supervised LAUNCHER ARGS...: run the launcher in a session of its own and stand between it and the
# signals of a scheduler or a user; returns the launcher's exit code. SIGTERM, SIGINT, SIGUSR1 or SIGHUP to this
# script (or to its whole process group) create the stop file every rank checks at each step boundary
# (HVD_LLAMA_STOP_FILE; one rank seeing it stops them all) and, with RELAY_USR1=1, send SIGUSR1 to the launcher
# too (mpirun and srun forward it to every rank, on every node). The ranks checkpoint and exit 0 within
# train.stop_grace_s. The launcher never sees the signal itself: mpirun would kill the ranks 1 s after its
# SIGTERM, horovodrun --gloo 5 s after, and horovodrun's MPI mode would leave them running. Ranks on this host
# also watch this script (HVD_LLAMA_LAUNCHER_PID): if it is killed, they checkpoint and exit by themselves.
# So Open MPI's sigkill timeout only paces the end of a job whose rank died (SIGTERM to the others after it, SIGKILL
# after twice it; the survivors, stuck in a collective, cannot checkpoint): back to Open MPI's 1 s, whatever the
# venv's activate set for plain mpirun (launch/install.sh).
run_supervised() {
  local rc
  export OMPI_MCA_odls_base_sigkill_timeout=1
  export HVD_LLAMA_STOP_FILE=${HVD_LLAMA_STOP_FILE:-$(mktemp -u "${TMPDIR:-/tmp}/hvd_llama_stop.XXXXXX")}
  export HVD_LLAMA_LAUNCHER_PID=$$ HVD_LLAMA_LAUNCHER_HOST=$HOSTNAME
  trap 'rm -f "$HVD_LLAMA_STOP_FILE"' EXIT
  trap request_stop TERM INT USR1 HUP
  setsid "$@" &  # not a group leader (no job control in scripts), so setsid does not fork: $! is the launcher
  LAUNCHER_PID=$!
  while :; do
    wait "$LAUNCHER_PID" && rc=0 || rc=$?
    kill -0 "$LAUNCHER_PID" 2>/dev/null || return "$rc"  # else wait was cut short by a trapped signal
  done
}

request_stop() {
  echo "[launch] stop requested: the ranks checkpoint at the next step boundary and exit" >&2
  : >"$HVD_LLAMA_STOP_FILE"
  [ "${RELAY_USR1:-0}" != 1 ] || [ -z "${LAUNCHER_PID:-}" ] || kill -USR1 "$LAUNCHER_PID" 2>/dev/null || true
}
