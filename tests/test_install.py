"""Packaging (pyproject, wheel, LICENSE, test extra) and launch/install.sh: a bad environment is refused with a
message saying what to install."""
import configparser
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

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
    assert packaged == in_tree and "hvd_llama/dist/__init__.py" in packaged
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
