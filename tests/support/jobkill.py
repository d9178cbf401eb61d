"""Start a training job under any launcher users have, signal or kill parts of it, and check what it leaves."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from hvd_llama import procs
from hvd_llama.cli import UserError
from hvd_llama.weights import checkpoint
from support import REPO
from support.files import executable
from support.multiproc import BIN, job_env, launcher_command

# horovodrun without --gloo hands the job to mpirun when Horovod has MPI (it has, here); the scripts are ours.
LAUNCHERS = ("horovodrun", "horovodrun-gloo", "mpirun", "train_single_node.sh", "train_mpirun.sh",
             "train_slurm.sbatch")
SCRIPTS = LAUNCHERS[3:]
# A stand-in for srun outside SLURM: drop srun's options, run the tasks with mpirun (which forwards SIGUSR1 as
# srun does).
STUB_SRUN = """#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done
exec mpirun --allow-run-as-root --oversubscribe -np 2 -bind-to none "$@"
"""


def command(launcher: str, train_args: list, tmp_path: Path) -> tuple[list, dict]:
    """argv and extra environment that run `python <train_args>` (`-m hvd_llama.train ...`) on 2 ranks."""
    module_args = train_args[2:]  # after "-m hvd_llama.train"
    env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}
    if launcher == "horovodrun":
        return [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", sys.executable, *train_args], env
    if launcher in ("horovodrun-gloo", "mpirun"):
        return launcher_command(launcher.split("-")[0], 2) + [sys.executable, *train_args], env
    script = str(REPO / "launch" / launcher)
    if launcher == "train_single_node.sh":
        return [script, "-n", "2", "--", *module_args], env
    if launcher == "train_mpirun.sh":
        return [script, "-H", "localhost:2", "--", *module_args], env
    if launcher == "train_elastic.sh":  # horovodrun --gloo with a discovery script, between 1 and 2 ranks
        discovery = executable(tmp_path / "discover_hosts.sh", "#!/bin/sh\necho localhost:2\n")
        return [script, "-n", "2", "--min-np", "1", "--max-np", "2", "-i", "lo", "-d", str(discovery), "--",
                *module_args], env
    srun = executable(tmp_path / "bin" / "srun", STUB_SRUN)
    env["PATH"] = f"{srun.parent}{os.pathsep}{job_env()['PATH']}"
    return [script, *module_args], env


def start(launcher: str, train_args: list, tmp_path: Path, env: Optional[dict] = None,
          shell: Sequence[str] = ()) -> subprocess.Popen:
    """`shell`: a command that execs the launcher's argv after it (e.g. bash sourcing an activate script)."""
    argv, extra = command(launcher, train_args, tmp_path)
    return start_command([*shell, *argv], tmp_path / f"{launcher}.log", {**extra, **(env or {})})


def start_command(argv: list, log_path: Path, env: Optional[dict] = None) -> subprocess.Popen:
    """Start a job in a session of its own, its output going to `log_path` (read it with output())."""
    log = open(log_path, "w+")
    proc = subprocess.Popen(argv, cwd=REPO, env=job_env(env), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    """The job's output so far (read through a file of our own: the job shares the log's file offset)."""
    return Path(proc.log.name).read_text(errors="replace") if hasattr(proc, "log") else ""


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except ValueError:  # a line being written
        return 0


def wait_for(condition: Callable[[], object], what: str, timeout: float = 120,
             proc: Optional[subprocess.Popen] = None) -> None:
    """Poll `condition` every 50 ms until it holds. AssertionError saying `what` never happened after `timeout`
    seconds, or as soon as `proc` (a job) has ended, with the end of the job's output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        if condition():
            return
        time.sleep(0.05)
    job = "" if proc is None else f" (exit code {proc.poll()}):\n{output(proc)[-3000:]}"
    raise AssertionError(f"{what} never happened{job}")


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen) -> None:
    """Until the job has logged `step` (it fails the wait by ending first)."""
    wait_for(lambda: last_step(run_dir) >= step, f"step {step}", proc=proc)


def job_processes(proc: subprocess.Popen) -> list[tuple[int, int, str]]:
    """(pid, start time, command) of the launcher and everything below it now."""
    found = []
    for pid in [proc.pid, *procs.descendants(proc.pid)]:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            continue
        found.append((pid, procs.start_time(pid), cmd))
    return [p for p in found if p[1] is not None]


def ranks_of(processes: list) -> list[int]:
    """The pids of the training ranks among a job's processes (not the shells that start them)."""
    return [pid for pid, _, cmd in processes if "hvd_llama.train" in cmd and "python" in cmd.split(" ")[0]]


def survivors(processes: list, timeout: float = 60) -> list:
    """The recorded processes still alive after up to `timeout` seconds (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in processes if procs.alive(p[0], p[1])]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def finish(proc: subprocess.Popen, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"job did not end within {timeout} s:\n{output(proc)[-3000:]}") from None


def kill_all(processes: list) -> None:
    """Clean up after a failed check: nothing of a job outlives its test."""
    for pid, started, _ in processes:
        if procs.alive(pid, started):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Outcome:
    returncode: int
    output: str
    stop_step: int  # the last step in metrics.jsonl
    checkpoints: list  # names of the checkpoints that verify (checksums match their manifest)
    corrupt: list  # names of those that do not
    left: list  # processes of the job alive 60 s after it ended
    seconds: float  # from the signal to the launcher's exit


def checkpoints(run_dir: Path) -> tuple[list, list]:
    """(names of the checkpoints that verify, names of those that do not)."""
    good, bad = [], []
    for path in checkpoint.list_checkpoints(run_dir):
        try:
            checkpoint.verify_checkpoint(path)
            good.append(path.name)
        except UserError:
            bad.append(path.name)
    return good, bad


def signal_job(launcher: str, sig: int, target: str, train_args: list, run_dir: Path, tmp_path: Path,
               at_step: int = 3, then: Optional[int] = None, env: Optional[dict] = None,
               shell: Sequence[str] = ()) -> Outcome:
    """Run a job (see start); once `at_step` is logged, send `sig` to the launcher alone, to its whole process
    group, or (target "rank") to one rank. `then`: `sig` is expected to be ignored: check that training goes on for
    1 s, say so in the output, and send `then` to the group."""
    proc = start(launcher, train_args, tmp_path, env, shell)
    try:
        wait_for_step(run_dir, at_step, proc)
        processes = job_processes(proc)
        if target == "rank":
            os.kill(ranks_of(processes)[-1], sig)
        else:
            (os.kill if target == "launcher" else os.killpg)(proc.pid, sig)
        sent = time.monotonic()
        if then is not None:
            step = last_step(run_dir)
            time.sleep(1)
            assert proc.poll() is None and last_step(run_dir) > step, output(proc)[-3000:]
            proc.log.write(f"still running 1 s after signal {sig}: sending {then} to the group\n")
            proc.log.flush()
            os.killpg(proc.pid, then)
        returncode = finish(proc)
        seconds = time.monotonic() - sent
        left = survivors(processes)
        kill_all(left)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return Outcome(returncode, output(proc), last_step(run_dir), *checkpoints(run_dir), left, seconds)
