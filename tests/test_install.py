"""launch/install.sh refuses a bad environment with a message saying what to install."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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


def install(tmp_path, missing: set) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=path_without(tmp_path, missing), HVD_LLAMA_NO_APT="1",
               HVD_LLAMA_CACHE=str(tmp_path / "cache"), HVD_LLAMA_VENV=str(Path(sys.executable).parents[1]))
    return subprocess.run([str(REPO / "launch" / "install.sh")], env=env, capture_output=True, text=True,
                          timeout=120)


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
