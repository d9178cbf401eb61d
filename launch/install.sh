#!/usr/bin/env bash
# Sets up hvd_llama: a virtual environment, PyTorch, OpenMPI, Horovod 0.28.1 built from source, and hvd_llama.
# Idempotent: re-running with the Horovod wheel cached takes seconds.
# Usage: launch/install.sh [--cuda | --cpu] [--dry-run] [--with-test-tools]
#   --cuda / --cpu      build Horovod with / without NCCL, whatever is detected. Default: with NCCL when a CUDA
#                       toolkit is found (CUDA_HOME, or nvcc on PATH) and the venv's torch is a CUDA build
#   --dry-run           print the Horovod build's environment, command and cache key; change nothing
#   --with-test-tools   also install iproute2 and openssh (the multi-node tests; they skip themselves without)
# Environment knobs:
#   HVD_LLAMA_VENV     virtual environment to create/use   (default: <repo>/.venv)
#   HVD_LLAMA_CACHE    where built Horovod wheels are kept (default: ~/.cache/hvd_llama)
#   PYTHON             interpreter for a new venv          (default: python3)
#   TORCH_VERSION      torch to install when none is there (default: 2.13.0)
#   HVD_LLAMA_NO_APT=1 never run apt-get; print what to install instead
#   HVD_LLAMA_MPI_STOP_GRACE_S  seconds plain mpirun/horovodrun give a stopping rank before SIGKILL (default: 60)
#   HVD_LLAMA_DRY_RUN=1, HVD_LLAMA_TEST_TOOLS=1: as --dry-run, --with-test-tools
#   HOROVOD_NCCL_HOME (or HOROVOD_NCCL_INCLUDE + HOROVOD_NCCL_LIB): where NCCL is, if not in the venv's nvidia-nccl
#                      package (CUDA torch wheels install it), the CUDA toolkit or /usr
#   HOROVOD_NCCL_LINK  SHARED or STATIC (default: STATIC when libnccl_static.a is there, else SHARED)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${HVD_LLAMA_VENV:-$REPO/.venv}
CACHE=${HVD_LLAMA_CACHE:-$HOME/.cache/hvd_llama}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
MPI_STOP_GRACE_S=${HVD_LLAMA_MPI_STOP_GRACE_S:-60}
HOROVOD_VERSION=0.28.1
PATCHES=cxx17-exitstatus  # what patch_cxx17 and patch_exit_status change: part of the wheel cache key
DRY_RUN=${HVD_LLAMA_DRY_RUN:-0}
TEST_TOOLS=${HVD_LLAMA_TEST_TOOLS:-0}
DEVICE=auto      # --cuda / --cpu
CUDA_HOME_FOUND=""  # the toolkit's root, when known
NVCC=""             # the toolkit's nvcc
NCCL_SO=""          # a libnccl.so.N the build links through a libnccl.so of its own (NCCL_LINK_DIR), if any
NCCL_LINK_DIR=""

say() { echo "[install] $*"; }
die() { echo "[install] error: $*" >&2; exit 1; }

need_tool() {  # need_tool <command> <what to install>
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found; install it first: $2"
}

apt_install() {  # apt_install <why> <packages...>: as root with apt-get, else print what to install
  local why=$1; shift
  if [ "${HVD_LLAMA_NO_APT:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "$why: apt-get install -y $*"
    (apt-get install -y -q "$@" || (apt-get update -q && apt-get install -y -q "$@")) >"$CACHE/apt.log" 2>&1 \
      || die "apt-get install $* failed; see $CACHE/apt.log"
  else
    return 1
  fi
}

ensure_mpi() {
  if command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1; then return; fi
  apt_install "OpenMPI missing" libopenmpi-dev openmpi-bin || die "OpenMPI not found (mpirun/mpicc). Install it: \
sudo apt-get install libopenmpi-dev openmpi-bin (or load your cluster's MPI module)"
}

ensure_test_tools() {
  # The multi-node tests build two hosts from network namespaces (iproute2) joined by real ssh; they skip
  # themselves when these are missing, so this is best effort.
  if command -v ip >/dev/null 2>&1 && command -v ssh >/dev/null 2>&1 && [ -x /usr/sbin/sshd ]; then return; fi
  apt_install "tools for the multi-node tests" iproute2 openssh-server openssh-client \
    || say "note: without iproute2 and openssh-server the multi-node tests will be skipped"
}

ensure_venv() {
  PY="$VENV/bin/python"
  [ ! -x "$PY" ] || return 0
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv $VENV' failed (Debian: apt-get install python3-venv)"
  "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
}

set_mpi_stop_grace() {
  # Plain mpirun, and horovodrun's MPI mode which runs it, SIGKILL the ranks odls_base_sigkill_timeout seconds
  # (Open MPI's default: 1) after they forward a SIGTERM or Ctrl-C: too soon for any checkpoint. The venv's
  # activate gives the README's commands the 60 s train.stop_grace_s takes at least (mpirun passes OMPI_MCA_
  # settings on to its daemons on other nodes); a value already in the shell wins. The launch/ scripts never
  # let mpirun see the signal and need none of it.
  local activate="$VENV/bin/activate" marker="# hvd_llama: plain mpirun's stop grace (launch/install.sh)"
  if [ ! -f "$activate" ]; then
    say "note: no $activate: export OMPI_MCA_odls_base_sigkill_timeout=$MPI_STOP_GRACE_S before plain mpirun/horovodrun"
    return 0
  fi
  { grep -vF "$marker" "$activate" || true; } >"$activate.tmp"  # a new value replaces the old line
  echo "export OMPI_MCA_odls_base_sigkill_timeout=\${OMPI_MCA_odls_base_sigkill_timeout:-$MPI_STOP_GRACE_S}  $marker" \
    >>"$activate.tmp"
  mv "$activate.tmp" "$activate"
  say "plain mpirun and horovodrun give a stopping job ${MPI_STOP_GRACE_S} s before SIGKILL once $activate is sourced"
}

probe_torch() {  # sets TORCH_FOUND (version), TORCH_CUDA (CUDA version it is built for, or "") and PY_VERSION
  local out
  local code="import sys, torch; print(torch.__version__, torch.version.cuda or '-', '%d.%d' % sys.version_info[:2])"
  out=$("$PY" -c "$code" 2>/dev/null) || return 1
  read -r TORCH_FOUND TORCH_CUDA PY_VERSION <<<"$out"
  [ "$TORCH_CUDA" != - ] || TORCH_CUDA=""
}

ensure_torch() {
  # A torch already in the venv (e.g. a CUDA build a GPU user installed) is respected, as long as it is >= 2.1.
  if probe_torch; then
    say "using installed torch $TORCH_FOUND"
  else
    say "installing torch==$TORCH_VERSION"
    "$PY" -m pip install -q "torch==$TORCH_VERSION" || die "pip install torch==$TORCH_VERSION failed"
    probe_torch || die "'import torch' fails in $PY after installing torch==$TORCH_VERSION"
  fi
  local major minor
  IFS=. read -r major minor _ <<<"${TORCH_FOUND%%+*}"
  [ "$major" -gt 2 ] || { [ "$major" = 2 ] && [ "$minor" -ge 1 ]; } \
    || die "torch does not match: hvd_llama needs torch >= 2.1 (found $TORCH_FOUND)"
}

find_cuda_toolkit() {  # sets NVCC and CUDA_HOME_FOUND; succeeds when a toolkit is found (CUDA_HOME, else nvcc on PATH)
  local root
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    CUDA_HOME_FOUND=$CUDA_HOME NVCC=$CUDA_HOME/bin/nvcc
    return 0
  fi
  NVCC=$(command -v nvcc 2>/dev/null) || return 1
  root=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
  [ -f "$root/include/cuda.h" ] && CUDA_HOME_FOUND=$root  # else a wrapper script: CMake finds the toolkit itself
  return 0
}

cuda_version() {  # the toolkit's full version, from "Cuda compilation tools, release 13.0, V13.0.88"
  local version
  version=$("$NVCC" --version 2>/dev/null | sed -n 's/.*release [0-9.]*, V\([0-9][0-9.]*\).*/\1/p')
  [ -n "$version" ] || die "cannot read the CUDA toolkit's version from '$NVCC --version'"
  echo "$version"
}

nccl_version() {  # nccl_version <nccl.h>: its NCCL_MAJOR.NCCL_MINOR.NCCL_PATCH
  local part number version=""
  for part in MAJOR MINOR PATCH; do
    number=$(sed -n "s/^#define NCCL_$part  *\([0-9][0-9]*\).*/\1/p" "$1" | head -1)
    [ -n "$number" ] || die "cannot read NCCL's version from $1 (no #define NCCL_$part)"
    version+=${version:+.}$number
  done
  echo "$version"
}

pip_nccl() {  # the venv's nvidia-nccl package (what CUDA torch wheels install: include/nccl.h, lib/libnccl.so.2)
  "$PY" -c "import nvidia.nccl as nccl; print(list(nccl.__path__)[0])" 2>/dev/null || true
}

check_nccl() {  # before a CUDA build: NCCL's header, version and library; exports where Horovod's CMake finds them
  local inc lib dir pip
  if [ -n "${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_INCLUDE:-}${HOROVOD_NCCL_LIB:-}" ]; then  # the user said where
    inc=(${HOROVOD_NCCL_INCLUDE:-${HOROVOD_NCCL_HOME:-}/include})
    lib=(${HOROVOD_NCCL_LIB:-${HOROVOD_NCCL_HOME:-}/lib} ${HOROVOD_NCCL_HOME:+$HOROVOD_NCCL_HOME/lib64})
  else
    # The venv's nvidia-nccl first: it is the NCCL torch loads, so a shared libnccl.so.2 of another version would
    # resolve to it at run time anyway, under headers of another version.
    pip=$(pip_nccl)
    inc=(${pip:+$pip/include} ${CUDA_HOME_FOUND:+$CUDA_HOME_FOUND/include} /usr/local/cuda/include /usr/include
         /usr/local/include)
    lib=(${pip:+$pip/lib} ${CUDA_HOME_FOUND:+$CUDA_HOME_FOUND/lib64 $CUDA_HOME_FOUND/lib} /usr/local/cuda/lib64
         /usr/lib/*-linux-gnu /usr/lib64 /usr/lib /usr/local/lib)
  fi
  for dir in "${inc[@]}"; do [ -f "$dir/nccl.h" ] && break; dir=""; done
  [ -n "$dir" ] || die "NCCL not found (no nccl.h in ${inc[*]}): install NVIDIA's libnccl-dev, or set HOROVOD_NCCL_HOME"
  export HOROVOD_NCCL_INCLUDE=$dir
  NCCL_VERSION=$(nccl_version "$dir/nccl.h")
  for dir in "${lib[@]}"; do compgen -G "$dir/libnccl[._]*" >/dev/null && break; dir=""; done
  [ -n "$dir" ] \
    || die "NCCL not found (no libnccl in ${lib[*]}): install NVIDIA's libnccl-dev, or set HOROVOD_NCCL_HOME"
  export HOROVOD_NCCL_LIB=$dir
  # Horovod links NCCL statically unless told otherwise; pip, conda and module installs often ship only the .so.
  if [ -z "${HOROVOD_NCCL_LINK:-}" ] && ! [ -f "$dir/libnccl_static.a" ]; then export HOROVOD_NCCL_LINK=SHARED; fi
  # CMake looks for libnccl.so, which pip's package and a runtime-only install lack: link to their libnccl.so.N.
  if [ "${HOROVOD_NCCL_LINK:-STATIC}" = SHARED ] && ! [ -e "$dir/libnccl.so" ]; then
    NCCL_SO=$(compgen -G "$dir/libnccl.so.*" | head -1) || true
    [ -n "$NCCL_SO" ] || die "HOROVOD_NCCL_LINK=SHARED but $dir has no libnccl.so: install NVIDIA's libnccl-dev"
    NCCL_LINK_DIR=$CACHE/nccl-lib
    export HOROVOD_NCCL_LIB=$NCCL_LINK_DIR
  fi
}

choose_build() {
  # Exports what Horovod's build reads, in this shell (a $(...) subshell would lose them), and sets KEY, the
  # wheel cache key, from what was exported. Inherited HOROVOD_GPU*/WITH*/WITHOUT* flags are dropped: the
  # flags below are the whole build, so the key describes the wheel.
  local name toolkit=0
  find_cuda_toolkit && toolkit=1
  if [ "$DEVICE" = auto ]; then
    DEVICE=cpu
    if [ "$toolkit" = 1 ] && [ -n "$TORCH_CUDA" ]; then DEVICE=cuda
    elif [ -n "$TORCH_CUDA" ]; then
      say "note: torch is built for CUDA $TORCH_CUDA but no CUDA toolkit was found (CUDA_HOME, nvcc): building" \
          "Horovod without NCCL; load the toolkit, then re-run (or pass --cuda)"
    fi
  fi
  if [ "$DEVICE" = cuda ]; then
    [ "$toolkit" = 1 ] || die "--cuda: no CUDA toolkit found; set CUDA_HOME or put nvcc on PATH"
    [ -n "$TORCH_CUDA" ] \
      || die "--cuda: torch $TORCH_FOUND in $VENV is a CPU build; install a CUDA build of torch first"
  fi
  for name in $(compgen -e); do
    case "$name" in HOROVOD_GPU*|HOROVOD_WITH_*|HOROVOD_WITHOUT_*) unset "$name" ;; esac
  done
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
  export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
  KEY="horovod-$HOROVOD_VERSION-$PATCHES-torch-$TORCH_FOUND-py$PY_VERSION-pytorch-gloo-mpi"
  if [ "$DEVICE" = cuda ]; then
    export HOROVOD_GPU_OPERATIONS=NCCL
    [ -z "$CUDA_HOME_FOUND" ] || export HOROVOD_CUDA_HOME=${HOROVOD_CUDA_HOME:-$CUDA_HOME_FOUND}
    check_nccl
    local cuda link
    cuda=$(cuda_version)
    link=$(tr '[:upper:]' '[:lower:]' <<<"${HOROVOD_NCCL_LINK:-STATIC}")
    say "CUDA build: toolkit ${CUDA_HOME_FOUND:-$NVCC} (CUDA $cuda), torch for CUDA $TORCH_CUDA: Horovod with" \
        "NCCL $NCCL_VERSION ($link) from $HOROVOD_NCCL_INCLUDE"
    # The wheel is compiled against this toolkit and NCCL's headers, and links NCCL this way: another one of
    # any of them is another wheel.
    KEY+="-nccl$NCCL_VERSION-$link-cuda$cuda"
  fi
}

build_command() {  # build_command <wheel dir> <horovod source dir>: sets BUILD_CMD, run with this shell's environment
  BUILD_CMD=("$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$1" "$2")
  export MAKEFLAGS="-j$(nproc)"
}

check_build_tools() {
  need_tool g++ "sudo apt-get install g++ (a C++17 compiler is needed to build Horovod)"
  need_tool cmake "sudo apt-get install cmake (or: $PY -m pip install cmake)"
}

patch_cxx17() {  # patch_cxx17 <horovod source dir>
  # torch >= 2.1 needs C++17; the 0.28.1 sdist pins C++14 (horovod issue #3996, fixed by PR #3998, unreleased).
  local file
  for file in "$1/CMakeLists.txt" "$1/horovod/torch/CMakeLists.txt"; do
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$file"
    grep -q 'set(CMAKE_CXX_STANDARD 17)' "$file" \
      || die "the C++17 patch did not apply to $file (no 'set(CMAKE_CXX_STANDARD 14)' there: Horovod's source changed)"
  done
}

patch_exit_status() {  # patch_exit_status <horovod source dir>
  # horovodrun --gloo could exit 0 for a job it stopped on SIGTERM: its middleman process waits for the rank's
  # shell with Popen.wait() while its stop thread waits for the same shell with psutil, which reaps it when it wins
  # the race; Popen.wait() then gets ECHILD and reports 0 (a preempted job looked like a finished one). The stop
  # thread now waits without reaping. Unfixed in 0.28.1, the last release.
  local file="$1/horovod/runner/common/util/safe_shell_exec.py"
  "$PY" - "$file" <<'PATCH' || die "the exit-status patch did not apply to $file (not one\
 'p.wait(timeout=GRACEFUL_TERMINATION_TIME_S)' there: Horovod's source changed)"
import sys
path, old = sys.argv[1], "        p.wait(timeout=GRACEFUL_TERMINATION_TIME_S)\n"
text = open(path).read()
if text.count(old) != 1:
    sys.exit(1)
open(path, "w").write(text.replace(old, "        _wait_unreaped(p, GRACEFUL_TERMINATION_TIME_S)\n") + """

def _wait_unreaped(p, timeout):
    # hvd_llama's patch (launch/install.sh): psutil's wait() reaps the shell, the middleman's child, before the
    # middleman's Popen.wait() can read its exit status, which then reads as 0.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)
    raise psutil.TimeoutExpired(timeout, p.pid)
""")
PATCH
}

build_horovod_wheel() {  # build_horovod_wheel <wheel dir>
  local out=$1 src log
  check_build_tools
  "$PY" -m pip install -q packaging wheel psutil pyyaml cloudpickle cffi || die "pip install of build helpers failed"
  src=$(mktemp -d)
  BUILD_SRC=$src && trap 'rm -rf "$BUILD_SRC"' EXIT  # also when the build stops half-way
  log="$CACHE/horovod-build.log"
  say "downloading horovod==$HOROVOD_VERSION source"
  "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$src" >"$log" 2>&1 \
    || die "could not download the horovod sdist; see $log"
  tar xzf "$src/horovod-$HOROVOD_VERSION.tar.gz" -C "$src"
  patch_cxx17 "$src/horovod-$HOROVOD_VERSION"
  patch_exit_status "$src/horovod-$HOROVOD_VERSION"
  [ -z "$NCCL_LINK_DIR" ] || { mkdir -p "$NCCL_LINK_DIR" && ln -sfn "$NCCL_SO" "$NCCL_LINK_DIR/libnccl.so"; }
  say "building Horovod (about 4 minutes on 2 cores); log: $log"
  rm -rf "$out.tmp" && mkdir -p "$out.tmp"
  build_command "$out.tmp" "$src/horovod-$HOROVOD_VERSION"
  "${BUILD_CMD[@]}" >>"$log" 2>&1 || die "Horovod build failed; the reason is at the end of $log"
  mv "$out.tmp" "$out"
}

dry_run() {  # what the build would get, exactly as build_horovod_wheel would run it
  local wheel_dir="$CACHE/wheels/$KEY"
  if [ -d "$wheel_dir" ]; then
    say "dry run: cache key $KEY: cached, nothing to build; a build would get this environment and command:"
  else
    check_build_tools
    say "dry run: cache key $KEY: not cached, would build with this environment and command:"
  fi
  build_command "$wheel_dir.tmp" "<unpacked horovod-$HOROVOD_VERSION sdist>"
  env | grep -E '^(HOROVOD_[A-Z0-9_]*|MAKEFLAGS)=' | sort
  echo "+ ${BUILD_CMD[*]}"
}

ensure_horovod() {
  local wheel_dir="$CACHE/wheels/$KEY"
  if [ -d "$wheel_dir" ]; then
    say "using cached Horovod wheel ($KEY)"
  else
    build_horovod_wheel "$wheel_dir"
  fi
  "$PY" -m pip install -q --no-deps --force-reinstall "$wheel_dir"/horovod-*.whl \
    || die "pip install of the Horovod wheel failed"
  "$PY" -m pip install -q psutil pyyaml cloudpickle cffi packaging || die "pip install of Horovod's dependencies failed"
}

verify_horovod() {
  local report part parts=(PyTorch Gloo MPI)
  [ "$DEVICE" != cuda ] || parts+=(NCCL)
  report=$(PATH="$VENV/bin:$PATH" "$VENV/bin/horovodrun" --check-build 2>&1) \
    || die "'horovodrun --check-build' failed: $report"
  for part in "${parts[@]}"; do
    grep -q "\[X\] $part" <<<"$report" || die "Horovod was built without $part ('horovodrun --check-build'\
 shows no [X] $part); the build log is $CACHE/horovod-build.log; remove $CACHE/wheels/$KEY to rebuild"
  done
  "$PY" -c "import horovod.torch" 2>"$CACHE/import.log" \
    || die "horovod.torch does not load with this torch (rebuild: rm -r $CACHE/wheels): $(tail -1 "$CACHE/import.log")"
  say "Horovod OK: ${parts[*]} available"
}

parse_args() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --cuda) DEVICE=cuda ;;
      --cpu) DEVICE=cpu ;;
      --dry-run) DRY_RUN=1 ;;
      --with-test-tools) TEST_TOOLS=1 ;;
      -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
      *) echo "[install] error: unknown argument '$1' (expected --cuda, --cpu, --dry-run, --with-test-tools)" >&2
         exit 2 ;;
    esac
    shift
  done
}

main() {
  parse_args "$@"
  [[ $MPI_STOP_GRACE_S =~ ^[1-9][0-9]*$ ]] \
    || die "HVD_LLAMA_MPI_STOP_GRACE_S=$MPI_STOP_GRACE_S: expected a whole number of seconds > 0"
  if [ "$DRY_RUN" = 1 ]; then  # nothing installed, nothing written: the venv and its torch must be there
    PY="$VENV/bin/python"
    probe_torch || die "dry run: no torch in $VENV yet (run launch/install.sh once first)"
    choose_build
    dry_run
    return
  fi
  mkdir -p "$CACHE"
  ensure_mpi
  [ "$TEST_TOOLS" != 1 ] || ensure_test_tools
  ensure_venv
  set_mpi_stop_grace
  ensure_torch
  choose_build
  ensure_horovod
  verify_horovod
  say "installing hvd_llama (editable, with test extras)"
  "$PY" -m pip install -q -e "$REPO[test]" || die "pip install -e $REPO[test] failed"
  say "done: activate with 'source $VENV/bin/activate'"
}

main "$@"
