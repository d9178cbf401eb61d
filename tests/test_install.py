"""Packaging (pyproject, wheel, LICENSE, test extra) and launch/install.sh: a bad environment is refused with a
message saying what to install."""
import configparser
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import psutil
import pytest
from packaging.requirements import Requirement
from support import REPO
from support.files import executable
from support.installer import SHELL_EXEC, SHELL_EXEC_WAIT, fake_venv, install, nccl_header


@pytest.mark.parametrize("missing, message", [
    ({"mpirun", "mpicc"}, "OpenMPI not found (mpirun/mpicc). Install it: sudo apt-get install libopenmpi-dev"),
    ({"g++"}, "'g++' not found; install it first: sudo apt-get install g++"),
    ({"cmake"}, "'cmake' not found; install it first: sudo apt-get install cmake"),
])
def test_missing_tool_is_named_with_its_fix(tmp_path, missing, message):
    done = install(tmp_path, missing)
    assert done.returncode == 1
    assert message in done.stderr
    assert not list((tmp_path / "cache").glob("wheels/*"))  # nothing half-built left in the cache


def test_wheel_builds_from_pyproject_with_the_package_and_license(tmp_path):
    """pyproject.toml's build backend turns a copy of the sources into a wheel holding hvd_llama and LICENSE."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ["pyproject.toml", "setup.cfg", "setup.py", "README.md", "LICENSE"]:
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "hvd_llama", src / "hvd_llama", ignore=shutil.ignore_patterns("__pycache__"))
    # No build isolation: an isolated build would download setuptools; the backend named in pyproject is used.
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "out")], check=True, capture_output=True, timeout=120)
    wheel, = (tmp_path / "out").glob("hvd_llama-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    packaged = {n for n in names if n.startswith("hvd_llama/") and n.endswith(".py")}
    in_tree = {p.relative_to(src).as_posix() for p in (src / "hvd_llama").rglob("*.py")}
    assert packaged == in_tree and "hvd_llama/parallel/__init__.py" in packaged
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "Requires-Python: >=3.10" in metadata
    assert 'Requires-Dist: transformers>=5.0; extra == "test"' in metadata
    build_system = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    assert build_system["build-backend"] == "setuptools.build_meta"
    assert {r.split(">")[0] for r in build_system["requires"]} == {"setuptools", "wheel"}


def test_license_is_the_apache_2_text_setup_cfg_declares():
    text = (REPO / "LICENSE").read_text()
    assert "license = Apache-2.0" in (REPO / "setup.cfg").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 190


def test_the_environment_running_the_tests_meets_the_test_extra():
    """The test extra's pins are what this suite runs with (transformers 5.x: the API test_convert calls)."""
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    pins = [Requirement(line) for line in parser["options.extras_require"]["test"].split("\n") if line.strip()]
    assert {pin.name for pin in pins} >= {"pytest", "pytest-timeout", "transformers"}
    for pin in pins:
        assert pin.specifier.contains(metadata.version(pin.name)), (pin, metadata.version(pin.name))


HIDE_HOROVOD = """
import sys
class HideHorovod:  # as if Horovod were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "horovod":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, HideHorovod())
import hvd_llama.train
"""


def test_train_without_horovod_says_in_one_line_to_run_the_installer():
    done = subprocess.run([sys.executable, "-c", HIDE_HOROVOD], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("ImportError: Horovod is missing or not built for this torch (No module named 'horovod'); "
                    "run launch/install.sh")
    assert "During handling" not in done.stderr  # one error, not two chained tracebacks


BASE_FLAGS = {"HOROVOD_WITH_PYTORCH=1", "HOROVOD_WITH_GLOO=1", "HOROVOD_WITH_MPI=1", "HOROVOD_WITHOUT_TENSORFLOW=1",
              "HOROVOD_WITHOUT_MXNET=1", f"MAKEFLAGS=-j{os.cpu_count()}"}
def fake_cuda_toolkit(tmp_path, nccl: bool = True, nccl_libs: tuple = ("libnccl_static.a",), nccl_version="2.27.3",
                      cuda_version: str = "13.0.88") -> Path:
    root = tmp_path / "cuda"
    executable(root / "bin" / "nvcc", "#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                                      f"echo 'Cuda compilation tools, release 13.0, V{cuda_version}'\n")
    (root / "include").mkdir()
    (root / "lib64").mkdir()
    (root / "include" / "cuda.h").write_text("")
    if nccl:
        (root / "include" / "nccl.h").write_text(nccl_header(nccl_version))
        for name in nccl_libs:
            (root / "lib64" / name).write_text("")
    return root


def pip_log(tmp_path) -> str:
    """The pip commands the installer ran in a fake venv."""
    log = tmp_path / "pip.log"
    return log.read_text() if log.exists() else ""


def printed_build(out: str) -> tuple[str, set]:
    """The cache key and the environment lines a dry run printed."""
    key = re.search(r"cache key (\S+):", out).group(1)
    return key, {line for line in out.splitlines() if re.match(r"(HOROVOD_\w+|MAKEFLAGS)=", line)}


def test_dry_run_on_a_cpu_machine_builds_without_nccl_whatever_the_shell_had(tmp_path):
    import torch
    done = install(tmp_path, {"nvcc"}, "--dry-run", HOROVOD_GPU_OPERATIONS="NCCL", HOROVOD_WITH_TENSORFLOW="1")
    assert done.returncode == 0, done.stderr
    key, env = printed_build(done.stdout)
    assert env == BASE_FLAGS  # the inherited NCCL and TensorFlow flags are gone: the key says what is built
    assert key == (f"horovod-0.28.1-cxx17-exitstatus-torch-{torch.__version__}-py%d.%d-pytorch-gloo-mpi"
                   % sys.version_info[:2])
    assert f"+ {sys.executable} -m pip wheel -v --no-build-isolation --no-deps -w " in done.stdout
    assert not (tmp_path / "cache").exists()  # a dry run writes nothing


@pytest.mark.parametrize("found_by", ["nvcc on PATH", "CUDA_HOME"])
def test_dry_run_with_a_cuda_toolkit_and_cuda_torch_builds_with_nccl(tmp_path, found_by):
    cuda, venv = fake_cuda_toolkit(tmp_path), fake_venv(tmp_path, torch_cuda="13.0")
    where = {"extra_path": cuda / "bin"} if found_by == "nvcc on PATH" else {"CUDA_HOME": str(cuda)}
    done = install(tmp_path, {"nvcc"}, "--dry-run", venv=venv, **where)
    assert done.returncode == 0, done.stderr
    key, env = printed_build(done.stdout)
    assert env == BASE_FLAGS | {"HOROVOD_GPU_OPERATIONS=NCCL", f"HOROVOD_CUDA_HOME={cuda}",
                                f"HOROVOD_NCCL_INCLUDE={cuda}/include", f"HOROVOD_NCCL_LIB={cuda}/lib64"}
    assert key == ("horovod-0.28.1-cxx17-exitstatus-torch-2.13.0+cu130-py%d.%d-pytorch-gloo-mpi-nccl2.27.3-static-"
                   "cuda13.0.88" % sys.version_info[:2])
    assert pip_log(tmp_path) == ""  # nothing installed or downloaded


@pytest.mark.parametrize("libs, lib_dir", [(("libnccl.so", "libnccl.so.2"), "{cuda}/lib64"),
                                           (("libnccl.so.2",), "{cache}/nccl-lib")])  # no -dev: a libnccl.so of its own
def test_nccl_without_its_static_library_is_linked_shared(tmp_path, libs, lib_dir):
    cuda, venv = fake_cuda_toolkit(tmp_path, nccl_libs=libs), fake_venv(tmp_path, torch_cuda="13.0")
    done = install(tmp_path, {"nvcc"}, "--dry-run", venv=venv, extra_path=cuda / "bin")
    assert done.returncode == 0, done.stderr
    key, env = printed_build(done.stdout)
    assert env == BASE_FLAGS | {"HOROVOD_GPU_OPERATIONS=NCCL", f"HOROVOD_CUDA_HOME={cuda}", "HOROVOD_NCCL_LINK=SHARED",
                                f"HOROVOD_NCCL_INCLUDE={cuda}/include",
                                "HOROVOD_NCCL_LIB=" + lib_dir.format(cuda=cuda, cache=tmp_path / "cache")}
    assert key.endswith("-nccl2.27.3-shared-cuda13.0.88")


def test_the_cache_key_names_the_toolkit_nccl_and_link_mode(tmp_path):
    """A wheel is compiled against one CUDA toolkit and NCCL's headers, and links NCCL one way: change any of
    them and the cached wheel is not the one to install."""
    def key(name, link=None, **toolkit):
        root = tmp_path / name
        cuda, venv = fake_cuda_toolkit(root, **toolkit), fake_venv(root, torch_cuda="13.0")
        done = install(root, {"nvcc"}, "--dry-run", venv=venv, extra_path=cuda / "bin",
                       **({"HOROVOD_NCCL_LINK": link} if link else {}))
        assert done.returncode == 0, done.stderr
        return printed_build(done.stdout)[0].split("-mpi-")[1]

    assert key("base") == "nccl2.27.3-static-cuda13.0.88"
    assert key("nccl", nccl_version="2.28.9") == "nccl2.28.9-static-cuda13.0.88"
    assert key("cuda", cuda_version="13.0.48") == "nccl2.27.3-static-cuda13.0.48"
    assert key("shared", link="SHARED", nccl_libs=("libnccl_static.a", "libnccl.so")) == \
        "nccl2.27.3-shared-cuda13.0.88"


def test_the_nccl_of_cuda_torch_wheels_is_found_and_preferred(tmp_path):
    """CUDA torch wheels install NCCL as the nvidia-nccl package (include/nccl.h, lib/libnccl.so.2 and no
    libnccl.so): the build uses it, through a libnccl.so of its own, even beside a toolkit's NCCL."""
    venv, cuda = fake_venv(tmp_path, torch_cuda="13.0", pip_nccl="2.26.5"), fake_cuda_toolkit(tmp_path, nccl=False)
    pip = tmp_path / "faketorch" / "nvidia" / "nccl"
    dry = install(tmp_path, {"nvcc"}, "--dry-run", venv=venv, extra_path=cuda / "bin")
    assert dry.returncode == 0, dry.stderr
    key, env = printed_build(dry.stdout)
    assert key.endswith("-nccl2.26.5-shared-cuda13.0.88")
    assert {f"HOROVOD_NCCL_INCLUDE={pip}/include", f"HOROVOD_NCCL_LIB={tmp_path}/cache/nccl-lib",
            "HOROVOD_NCCL_LINK=SHARED"} <= env
    done = install(tmp_path, {"nvcc"}, venv=venv, extra_path=cuda / "bin")
    assert done.returncode == 0, done.stderr
    assert set((tmp_path / "build_env.txt").read_text().splitlines()) == env
    assert (tmp_path / "cache" / "nccl-lib" / "libnccl.so").resolve() == pip / "lib" / "libnccl.so.2"
    (tmp_path / "cuda" / "include" / "nccl.h").write_text(nccl_header("2.27.3"))  # a toolkit NCCL too
    (tmp_path / "cuda" / "lib64" / "libnccl_static.a").write_text("")
    again = install(tmp_path, {"nvcc"}, "--dry-run", venv=venv, extra_path=cuda / "bin")
    assert printed_build(again.stdout)[0] == key  # torch's own NCCL still


@pytest.mark.parametrize("args, torch_cuda, toolkit, nccl_expected", [
    ((), None, True, False),          # this machine's case: a CUDA toolkit, but torch is a CPU build
    ((), "13.0", False, False),       # a CUDA torch without a toolkit cannot build NCCL's operations
    (("--cpu",), "13.0", True, False),  # the switch wins over detection
    (("--cuda",), "13.0", True, True),
])
def test_detection_and_the_explicit_switch(tmp_path, args, torch_cuda, toolkit, nccl_expected):
    venv = fake_venv(tmp_path, torch_cuda=torch_cuda)
    extra = {"extra_path": fake_cuda_toolkit(tmp_path) / "bin"} if toolkit else {}
    done = install(tmp_path, {"nvcc"}, "--dry-run", *args, venv=venv, **extra)
    assert done.returncode == 0, done.stderr
    key, env = printed_build(done.stdout)
    assert ("HOROVOD_GPU_OPERATIONS=NCCL" in env) == nccl_expected == ("-nccl" in key)


@pytest.mark.parametrize("torch_cuda, toolkit, message", [
    ("13.0", False, "--cuda: no CUDA toolkit found; set CUDA_HOME or put nvcc on PATH"),
    (None, True, "--cuda: torch 2.13.0+cpu in {venv} is a CPU build; install a CUDA build of torch first"),
])
def test_cuda_switch_refuses_what_cannot_build_nccl(tmp_path, torch_cuda, toolkit, message):
    venv = fake_venv(tmp_path, torch_cuda=torch_cuda)
    extra = {"extra_path": fake_cuda_toolkit(tmp_path) / "bin"} if toolkit else {}
    done = install(tmp_path, {"nvcc"}, "--cuda", venv=venv, **extra)
    assert (done.returncode, done.stderr) == (1, f"[install] error: {message.format(venv=venv)}\n")
    assert "download" not in pip_log(tmp_path)


def test_missing_nccl_stops_before_the_build_in_one_line(tmp_path):
    venv, cuda = fake_venv(tmp_path, torch_cuda="13.0"), fake_cuda_toolkit(tmp_path, nccl=False)
    (tmp_path / "nccl").mkdir()
    done = install(tmp_path, {"nvcc"}, venv=venv, extra_path=cuda / "bin", HOROVOD_NCCL_HOME=str(tmp_path / "nccl"))
    assert done.returncode == 1
    assert done.stderr == (f"[install] error: NCCL not found (no nccl.h in {tmp_path}/nccl/include): install "
                           "NVIDIA's libnccl-dev, or set HOROVOD_NCCL_HOME\n")
    assert "download" not in pip_log(tmp_path)


def test_the_build_gets_the_flags_the_dry_run_printed_then_the_cache_is_reused(tmp_path):
    """The bug this guards: flags exported in a $(...) subshell never reached `pip wheel`."""
    venv, cuda = fake_venv(tmp_path, torch_cuda="13.0"), fake_cuda_toolkit(tmp_path)
    dry = install(tmp_path, {"nvcc"}, "--dry-run", venv=venv, extra_path=cuda / "bin")
    key, printed_env = printed_build(dry.stdout)
    done = install(tmp_path, {"nvcc"}, venv=venv, extra_path=cuda / "bin")
    assert done.returncode == 0, done.stderr
    assert set((tmp_path / "build_env.txt").read_text().splitlines()) == printed_env
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in printed_env and key.endswith("-nccl2.27.3-static-cuda13.0.88")
    built = (tmp_path / "built_cmake.txt").read_text()
    assert built.count("set(CMAKE_CXX_STANDARD 17)") == 2 and "STANDARD 14" not in built
    shell_exec = (tmp_path / "built_shell_exec.py").read_text()
    compile(shell_exec, "safe_shell_exec.py", "exec")
    assert "_wait_unreaped(p, GRACEFUL_TERMINATION_TIME_S)" in shell_exec and "p.wait(" not in shell_exec
    assert list((tmp_path / "cache" / "wheels" / key).glob("horovod-*.whl"))
    assert "[install] Horovod OK: PyTorch Gloo MPI NCCL available" in done.stdout
    (tmp_path / "pip.log").unlink()
    again = install(tmp_path, {"nvcc"}, venv=venv, extra_path=cuda / "bin")
    assert again.returncode == 0, again.stderr
    assert f"using cached Horovod wheel ({key})" in again.stdout
    assert not re.search(r"^pip (download|wheel)", pip_log(tmp_path), re.M)


def test_a_cuda_install_fails_in_one_line_unless_check_build_shows_nccl(tmp_path):
    venv, cuda = fake_venv(tmp_path, torch_cuda="13.0", nccl_in_build=False), fake_cuda_toolkit(tmp_path)
    done = install(tmp_path, {"nvcc"}, venv=venv, extra_path=cuda / "bin")
    assert done.returncode == 1
    line, = done.stderr.splitlines()
    assert line.startswith("[install] error: Horovod was built without NCCL ('horovodrun --check-build' shows no")
    assert "pip install -q -e" not in pip_log(tmp_path)  # hvd_llama not installed over it


@pytest.mark.parametrize("patch, file, changed", [
    ("C++17", "torch/CMakeLists.txt", dict(torch_cmake="set(CMAKE_CXX_STANDARD 20)\n")),
    ("exit-status", SHELL_EXEC, dict(shell_exec=SHELL_EXEC_WAIT.replace("p.wait(", "p.wait_for(")))])
def test_each_patch_must_take_effect(tmp_path, patch, file, changed):
    venv = fake_venv(tmp_path, torch_cuda=None, **changed)
    done = install(tmp_path, {"nvcc"}, venv=venv)
    assert done.returncode == 1
    line, = done.stderr.splitlines()
    assert line.startswith(f"[install] error: the {patch} patch did not apply to ")
    assert line.split(" to ")[1].split(" (")[0].endswith(f"/horovod-0.28.1/horovod/{file}")
    assert not (tmp_path / "build_env.txt").exists() and not list((tmp_path / "cache").glob("wheels/*"))


def test_horovodrun_reports_the_exit_status_of_a_rank_it_stopped():
    """The installed Horovod carries patch_exit_status. Without it, horovodrun --gloo's stop thread (psutil) reaped
    a rank's shell that had exited during the grace period, and the middleman's Popen.wait() then read exit status
    0: a job stopped by SIGTERM could end with 0. Here the shell has exited (a zombie) when the stop runs."""
    from horovod.runner.common.util.safe_shell_exec import terminate_executor_shell_and_children
    shell = subprocess.Popen(["sh", "-c", "exit 130"])
    deadline = time.monotonic() + 30
    while psutil.Process(shell.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.01)
    terminate_executor_shell_and_children(shell.pid)
    assert shell.wait(timeout=30) == 130


@pytest.mark.parametrize("ask", [False, True])
def test_multinode_test_tools_only_when_asked(tmp_path, ask):
    venv = fake_venv(tmp_path, torch_cuda=None)
    done = install(tmp_path, {"nvcc", "ip"}, *(["--with-test-tools"] if ask else []), venv=venv)
    assert done.returncode == 0, done.stderr
    assert ("without iproute2 and openssh-server the multi-node tests will be skipped" in done.stdout) == ask


def test_ci_runs_readme_command_2_verbatim():
    readme = (REPO / "README.md").read_text()
    command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command == "./launch/install.sh --with-test-tools && .venv/bin/python -m pytest"
    assert "# 2. set up everything" in readme and f"\n{command}\n```" in readme


ACTIVATE = "# the venv's own activate script\nexport VIRTUAL_ENV=/somewhere/venv\n"


def sourced(activate: Path, **env_vars: str) -> str:
    """OMPI_MCA_odls_base_sigkill_timeout in a shell that sourced `activate`."""
    env = {k: v for k, v in os.environ.items() if k != "OMPI_MCA_odls_base_sigkill_timeout"}
    return subprocess.run(["bash", "-c", f"source '{activate}' && echo \"$OMPI_MCA_odls_base_sigkill_timeout\""],
                          env={**env, **env_vars}, capture_output=True, text=True, check=True).stdout.strip()


def test_the_venvs_activate_gives_plain_mpirun_a_stop_grace_once(tmp_path):
    """Plain mpirun (and horovodrun's MPI mode) SIGKILLs the ranks 1 s after forwarding a SIGTERM: sourcing the
    venv's activate gives them 60 s, or HVD_LLAMA_MPI_STOP_GRACE_S; a value the shell already has wins."""
    venv = fake_venv(tmp_path, torch_cuda=None)
    activate = venv / "bin" / "activate"
    activate.write_text(ACTIVATE)
    done = install(tmp_path, {"nvcc"}, venv=venv)
    assert done.returncode == 0, done.stderr
    assert activate.read_text().startswith(ACTIVATE)
    assert sourced(activate) == "60"
    assert sourced(activate, OMPI_MCA_odls_base_sigkill_timeout="5") == "5"
    again = install(tmp_path, {"nvcc"}, venv=venv, HVD_LLAMA_MPI_STOP_GRACE_S="90")
    assert again.returncode == 0, again.stderr
    assert activate.read_text().count("odls_base_sigkill_timeout") == 2  # one line (the variable twice), replaced
    assert sourced(activate) == "90"
    bad = install(tmp_path, {"nvcc"}, venv=venv, HVD_LLAMA_MPI_STOP_GRACE_S="1.5")
    assert (bad.returncode, bad.stderr) == (1, "[install] error: HVD_LLAMA_MPI_STOP_GRACE_S=1.5: expected a whole "
                                               "number of seconds > 0\n")
    assert sourced(activate) == "90"
