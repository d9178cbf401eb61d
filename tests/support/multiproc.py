"""Run Python under real `horovodrun` (Gloo) or `mpirun` jobs and collect each rank's output."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from hvd_llama.bench.common import job_env as bench_job_env
from hvd_llama.procs import LAUNCHER_ENV
from support import REPO

BIN = Path(sys.executable).parent
# horovodrun tags lines "[1]<stdout>:", mpirun --tag-output "[1,1]<stdout>:" (job, rank).
TAGGED_LINE = re.compile(r"^\[(?:\d+,)?(\d+)\]<(stdout|stderr)>:?(.*)$")
LAUNCHERS = ("horovodrun", "mpirun")


@dataclass
class JobResult:
    returncode: int
    output: str  # everything the launcher printed
    ranks: dict  # rank -> list of that rank's stdout lines

    def lines(self, rank: int) -> list:
        return self.ranks.get(rank, [])


def launcher_command(launcher: str, np: int, extra: Sequence[str] = ()) -> list:
    if launcher == "horovodrun":
        hosts = [] if "--host-discovery-script" in extra else ["-H", f"localhost:{np}"]  # elastic: discovered
        return [str(BIN / "horovodrun"), "--gloo", "-np", str(np), *hosts, *extra]
    if launcher == "mpirun":
        return ["mpirun", "--allow-run-as-root", "--oversubscribe", "--tag-output", "-np", str(np),
                "-bind-to", "none", "-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", *extra]
    raise ValueError(f"unknown launcher {launcher}")


def job_env(extra: Optional[dict] = None) -> dict:
    """hvd_llama's job environment (this Python's scripts on PATH, this hvd_llama importable), with one
    OpenMP thread per process unless the caller's environment or `extra` says otherwise, and Open MPI's own
    sigkill timeout unless `extra` says otherwise: the suite's stop and crash timings are Open MPI's, which a shell
    that sourced the venv's activate (launch/install.sh: 60 s) would stretch to minutes."""
    return bench_job_env({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                          "OMPI_MCA_odls_base_sigkill_timeout": "1", **(extra or {})})


# Runs a command's main() and then reports, as stderr's last line, whether anything imported Horovod.
ONE_PROCESS = """import sys
from importlib import import_module
try:
    import_module(sys.argv[1]).main(sys.argv[2:])
finally:
    print(f"horovod imported: {'horovod' in sys.modules}", file=sys.stderr)
"""


def run_one_process(module: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m module args...` as one plain process, outside any launcher (its variables removed)."""
    launcher_variables = {name for _, rank, size in LAUNCHER_ENV for name in (rank, size)}
    env = {k: v for k, v in job_env().items() if k not in launcher_variables}
    return subprocess.run([sys.executable, "-c", ONE_PROCESS, module, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def start_job(args: Sequence[str], np: int = 2, launcher: str = "horovodrun", cwd=None,
              env: Optional[dict] = None, launcher_args: Sequence[str] = ()) -> subprocess.Popen:
    """Start `python <args>` on `np` ranks in a new process group; `np=0` runs one plain process."""
    prefix = launcher_command(launcher, np, launcher_args) if np else []
    return subprocess.Popen(prefix + [sys.executable, *args], cwd=cwd or REPO, env=job_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish_job(proc: subprocess.Popen, timeout: float = 120) -> JobResult:
    """Wait for the job; the whole process group is killed if it outlives `timeout`."""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"job timed out after {timeout}s:\n{output[-4000:]}") from None
    ranks: dict = {}
    for line in output.splitlines():
        match = TAGGED_LINE.match(line)
        if match and match.group(2) == "stdout":
            ranks.setdefault(int(match.group(1)), []).append(match.group(3))
    return JobResult(proc.returncode, output, ranks)


def run_job(args: Sequence[str], np: int = 2, launcher: str = "horovodrun", timeout: float = 120,
            cwd=None, env: Optional[dict] = None, launcher_args: Sequence[str] = ()) -> JobResult:
    return finish_job(start_job(args, np, launcher, cwd, env, launcher_args), timeout)


def run_snippet(code: str, tmp_path: Path, args: Sequence[str] = (), **kwargs) -> JobResult:
    script = tmp_path / "snippet.py"
    script.write_text(code)
    return run_job([str(script), *args], **kwargs)
