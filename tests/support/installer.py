"""launch/install.sh run as a test runs it: this machine's tools minus some, and a stand-in venv in which nothing is
built (used by test_install.py, and by test_preemption.py for the venv's activate script)."""
import os
import subprocess
import sys
from pathlib import Path

from support import REPO
from support.files import executable


def path_without(tmp_path, missing: set) -> str:
    """A PATH with every command of this machine's PATH except `missing`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in [str(Path(sys.executable).parent)] + os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            target = Path(folder) / name
            if name not in missing and not (bin_dir / name).exists() and os.access(target, os.X_OK):
                (bin_dir / name).symlink_to(target)
    return str(bin_dir)


def install(tmp_path, missing: set, *args: str, venv: Path = Path(sys.executable).parents[1],
            extra_path: Path | None = None, **env_vars: str) -> subprocess.CompletedProcess:
    """launch/install.sh with this machine's tools minus `missing` (plus `extra_path` first), no apt-get, a fresh
    cache, and no CUDA or Horovod build settings inherited from the machine unless given in `env_vars`."""
    if not (tmp_path / "bin").exists():
        path_without(tmp_path, missing)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOROVOD_", "CUDA_HOME", "HVD_LLAMA_"))}
    env.update(PATH=os.pathsep.join(([str(extra_path)] if extra_path else []) + [str(tmp_path / "bin")]),
               HVD_LLAMA_NO_APT="1", HVD_LLAMA_CACHE=str(tmp_path / "cache"), HVD_LLAMA_VENV=str(venv), **env_vars)
    return subprocess.run([str(REPO / "launch" / "install.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=120)


# The installer's Horovod build, exercised without compiling: a stand-in venv whose python is the real one except
# that pip only logs (faking Horovod's sdist download and recording the environment `pip wheel` is started with),
# torch is a two-line module reporting a chosen CUDA version, and horovodrun --check-build lists NCCL or not.
CMAKE_CXX14 = "cmake_minimum_required(VERSION 3.13)\nset(CMAKE_CXX_STANDARD 14)\n"
SHELL_EXEC = "runner/common/util/safe_shell_exec.py"
SHELL_EXEC_WAIT = ("import time\n\nimport psutil\n\n\ndef stop_shell(p):\n    try:\n"
                   "        p.wait(timeout=GRACEFUL_TERMINATION_TIME_S)\n    except psutil.TimeoutExpired:\n"
                   "        p.kill()\n")  # the lines of Horovod's SHELL_EXEC that patch_exit_status changes
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1 $2" = "-m pip" ]; then
  echo "pip ${*:3}" >> @log@
  case "$3" in
    download) tar czf "${@: -1}/horovod-0.28.1.tar.gz" -C @sdist@ horovod-0.28.1 ;;
    wheel) while [ "$1" != -w ]; do shift; done
           env | grep -E '^(HOROVOD_[A-Z0-9_]*|MAKEFLAGS)=' | sort > @build_env@
           cat "$3/CMakeLists.txt" "$3/horovod/torch/CMakeLists.txt" > @built_cmake@
           cp "$3/horovod/@shell_exec@" @built_shell_exec@
           touch "$2/horovod-0.28.1-cp311-cp311-linux_x86_64.whl" ;;
  esac
  exit 0
fi
[[ "$*" != *"import horovod.torch"* ]] || exit 0
PYTHONPATH=@torch@ exec @python@ "$@"
"""
CHECK_BUILD = """#!/usr/bin/env bash
printf 'Horovod v0.28.1:\\n\\nAvailable Frameworks:\\n    [ ] TensorFlow\\n    [X] PyTorch\\n    [ ] MXNet\\n\\n'
printf 'Available Controllers:\\n    [X] MPI\\n    [X] Gloo\\n\\n'
printf 'Available Tensor Operations:\\n    [{nccl}] NCCL\\n    [ ] DDL\\n    [ ] CCL\\n    [X] MPI\\n    [X] Gloo\\n'
"""


def nccl_header(version: str) -> str:
    major, minor, patch = version.split(".")
    return (f'#define NCCL_MAJOR {major}\n#define NCCL_MINOR {minor}\n#define NCCL_PATCH {patch}\n'
            '#define NCCL_SUFFIX ""\n')


def fake_venv(tmp_path, torch_cuda: str | None, nccl_in_build: bool = True, torch_cmake: str = CMAKE_CXX14,
              pip_nccl: str | None = None, shell_exec: str = SHELL_EXEC_WAIT) -> Path:
    """`pip_nccl`: the version of an nvidia-nccl package in the venv, laid out as CUDA torch wheels install it.
    The build copies what it saw of the sdist's patched files to built_cmake.txt and built_shell_exec.py."""
    venv, sdist = tmp_path / "venv", tmp_path / "sdist" / "horovod-0.28.1"
    (sdist / "horovod" / "torch").mkdir(parents=True)
    (sdist / "CMakeLists.txt").write_text(CMAKE_CXX14)
    (sdist / "horovod" / "torch" / "CMakeLists.txt").write_text(torch_cmake)
    (sdist / "horovod" / SHELL_EXEC).parent.mkdir(parents=True)
    (sdist / "horovod" / SHELL_EXEC).write_text(shell_exec)
    torch = tmp_path / "faketorch" / "torch"
    torch.mkdir(parents=True)
    if pip_nccl:  # a namespace package, nvidia.nccl, beside torch
        (torch.parent / "nvidia" / "nccl" / "include").mkdir(parents=True)
        (torch.parent / "nvidia" / "nccl" / "include" / "nccl.h").write_text(nccl_header(pip_nccl))
        (torch.parent / "nvidia" / "nccl" / "lib").mkdir()
        (torch.parent / "nvidia" / "nccl" / "lib" / "libnccl.so.2").write_text("")
    (torch / "__init__.py").write_text(f"__version__ = '2.13.0+{'cu130' if torch_cuda else 'cpu'}'\n"
                                       f"class version:\n    cuda = {torch_cuda!r}\n")
    script = FAKE_PYTHON
    values = dict(log=tmp_path / "pip.log", sdist=sdist.parent, build_env=tmp_path / "build_env.txt",
                  built_cmake=tmp_path / "built_cmake.txt", built_shell_exec=tmp_path / "built_shell_exec.py",
                  shell_exec=SHELL_EXEC, torch=torch.parent, python=sys.executable)
    for name, value in values.items():
        script = script.replace(f"@{name}@", str(value))
    executable(venv / "bin" / "python", script)
    executable(venv / "bin" / "horovodrun", CHECK_BUILD.format(nccl="X" if nccl_in_build else " "))
    return venv
