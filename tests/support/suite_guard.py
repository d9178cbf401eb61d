"""Keeps one broken test, or a machine that runs out of something, from taking the rest of the suite down with it
unseen. After every test: the checkout and the Python running the suite must still be there (every later test
needs them; without them each would fail or wait out its own timeout, and the suite would outlive CI's limit
before printing a single reason), else the suite stops at once naming the test. When anything failed, the summary
ends with what the machine had left (disk, memory, processes), which is what a failure on CI cannot otherwise tell.
conftest.py uses these hooks; setup.cfg gives every test a timeout (pytest-timeout) for the same reason."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from support import REPO

NEEDED = (REPO / "hvd_llama" / "__init__.py", REPO / "tests" / "conftest.py", Path(sys.executable))


def machine_state() -> str:
    """Free disk where the checkout and the temporary files are, available memory, and how many processes run
    (Linux's /proc, which the product reads too: procs.py)."""
    disks = [f"{shutil.disk_usage(path).free / 2**30:.1f} GiB free on {path}"
             for path in (REPO, Path(tempfile.gettempdir())) if path.exists()]
    available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable:"))
    processes = sum(entry.isdigit() for entry in os.listdir("/proc"))
    return ", ".join([*disks, f"{available / 2**30:.1f} GiB of memory available", f"{processes} processes"])


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    gone = [str(path) for path in NEEDED if not path.exists()]
    if gone:
        pytest.exit(f"stopping the suite: {', '.join(gone)} vanished by the end of {item.nodeid} (every later test "
                    f"needs them); the machine: {machine_state()}", returncode=3)


def pytest_terminal_summary(terminalreporter, exitstatus):
    if exitstatus != 0:
        terminalreporter.write_line(f"the machine at the end of the suite: {machine_state()}")
