#!/usr/bin/env bash
# Sets up hvd_llama: a virtual environment, PyTorch, OpenMPI, Horovod 0.28.1 built from source, and hvd_llama.
# Idempotent: re-running with the Horovod wheel cached takes seconds.
#
# Environment knobs:
#   HVD_LLAMA_VENV     virtual environment to create/use   (default: <repo>/.venv)
#   HVD_LLAMA_CACHE    where built Horovod wheels are kept (default: ~/.cache/hvd_llama)
#   PYTHON             interpreter for a new venv          (default: python3)
#   TORCH_VERSION      torch to install when none is there (default: 2.13.0)
#   HVD_LLAMA_NO_APT=1 never run apt-get; print what to install instead
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${HVD_LLAMA_VENV:-$REPO/.venv}
CACHE=${HVD_LLAMA_CACHE:-$HOME/.cache/hvd_llama}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
HOROVOD_VERSION=0.28.1

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
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv $VENV' failed (Debian: apt-get install python3-venv)"
  fi
  PY="$VENV/bin/python"
  "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
}

ensure_torch() {
  # A torch already in the venv (e.g. a CUDA build a GPU user installed) is respected, as long as it is >= 2.1.
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    say "using installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
  else
    say "installing torch==$TORCH_VERSION"
    "$PY" -m pip install -q "torch==$TORCH_VERSION" || die "pip install torch==$TORCH_VERSION failed"
  fi
  "$PY" - <<'PYEOF' || die "torch does not match: hvd_llama needs torch >= 2.1 (found $("$PY" -c 'import torch; print(torch.__version__)'))"
import torch, sys
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 1) else 1)
PYEOF
}

build_flags() {
  # Horovod reads these at build time; they are part of the wheel cache key.
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
  export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export HOROVOD_GPU_OPERATIONS=NCCL
  else
    unset HOROVOD_GPU_OPERATIONS
  fi
  echo "pytorch-gloo-mpi${HOROVOD_GPU_OPERATIONS:+-nccl}"
}

build_horovod_wheel() {  # build_horovod_wheel <wheel dir>
  local out=$1 src log
  need_tool g++ "sudo apt-get install g++ (a C++17 compiler is needed to build Horovod)"
  need_tool cmake "sudo apt-get install cmake (or: $PY -m pip install cmake)"
  "$PY" -m pip install -q packaging wheel psutil pyyaml cloudpickle cffi || die "pip install of build helpers failed"
  src=$(mktemp -d)
  log="$CACHE/horovod-build.log"
  say "downloading horovod==$HOROVOD_VERSION source"
  "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$src" >"$log" 2>&1 \
    || die "could not download the horovod sdist; see $log"
  tar xzf "$src/horovod-$HOROVOD_VERSION.tar.gz" -C "$src"
  # torch >= 2.1 needs C++17; the 0.28.1 sdist pins C++14 (horovod issue #3996, fixed by PR #3998, unreleased).
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
    "$src/horovod-$HOROVOD_VERSION/CMakeLists.txt" "$src/horovod-$HOROVOD_VERSION/horovod/torch/CMakeLists.txt"
  say "building Horovod (about 4 minutes on 2 cores); log: $log"
  mkdir -p "$out.tmp"
  MAKEFLAGS="-j$(nproc)" "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$out.tmp" \
    "$src/horovod-$HOROVOD_VERSION" >>"$log" 2>&1 || die "Horovod build failed; the reason is at the end of $log"
  mv "$out.tmp" "$out"
  rm -rf "$src"
}

ensure_horovod() {
  local flags key wheel_dir
  flags=$(build_flags)
  key="horovod-$HOROVOD_VERSION-torch-$("$PY" -c 'import torch; print(torch.__version__)')-py$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-$flags"
  wheel_dir="$CACHE/wheels/$key"
  if [ -d "$wheel_dir" ]; then
    say "using cached Horovod wheel ($key)"
  else
    build_horovod_wheel "$wheel_dir"
  fi
  "$PY" -m pip install -q --no-deps --force-reinstall "$wheel_dir"/horovod-*.whl || die "pip install of the Horovod wheel failed"
  "$PY" -m pip install -q psutil pyyaml cloudpickle cffi packaging || die "pip install of Horovod's dependencies failed"
}

verify_horovod() {
  local report
  report=$(PATH="$VENV/bin:$PATH" "$VENV/bin/horovodrun" --check-build 2>&1) \
    || die "'horovodrun --check-build' failed: $report"
  for part in PyTorch Gloo MPI; do
    grep -q "\[X\] $part" <<<"$report" || die "Horovod was built without $part:
$report
(the build log is $CACHE/horovod-build.log; remove $CACHE/wheels to rebuild)"
  done
  "$PY" -c "import horovod.torch" 2>"$CACHE/import.log" \
    || die "horovod.torch does not load with this torch (rebuild: rm -r $CACHE/wheels): $(tail -1 "$CACHE/import.log")"
  say "Horovod OK: PyTorch, Gloo and MPI available"
}

main() {
  mkdir -p "$CACHE"
  ensure_mpi
  ensure_test_tools
  ensure_venv
  ensure_torch
  ensure_horovod
  verify_horovod
  say "installing hvd_llama (editable, with test extras)"
  "$PY" -m pip install -q -e "$REPO[test]" || die "pip install -e $REPO[test] failed"
  say "done: activate with 'source $VENV/bin/activate'"
}

main "$@"
