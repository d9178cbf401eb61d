"""The processes of a job: stop requests (signals, a stop file, the launcher's death) with a grace period,
which launcher started this process and whether it is still there, the ranks of a job started without one
(OneProcess), and reaping a whole process tree when the process that started it dies (so that no rank outlives
its job).

Linux /proc only; elsewhere the launcher is never reported gone and nothing is reaped. Standard library only:
the reaper (`python -m hvd_llama.procs PID START_TIME`) starts in milliseconds.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

# Programs that launch ranks; horovodrun's MPI mode runs `/bin/sh -c "mpirun ..."` in its own place.
LAUNCHERS = ("horovodrun", "mpirun", "mpiexec", "orterun", "prterun", "srun")
SHELLS = ("sh", "dash", "bash")
# What each launcher tells the processes it starts: (launcher, rank variable, world-size variable), the launchers
# that build a Horovod world first. SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: srun sets it for the tasks of its
# step, while SLURM_NTASKS is also set in the batch script itself, where one process may run alone.
LAUNCHER_ENV = (("horovodrun", "HOROVOD_RANK", "HOROVOD_SIZE"), ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                ("MPICH, srun --mpi", "PMI_RANK", "PMI_SIZE"), ("srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"))
HOROVOD_LAUNCHERS = LAUNCHER_ENV[:3]  # a process they start is a rank of a Horovod world (srun alone is not)
# A rank of a launched job: a launcher's variable, or our launch scripts' own.
RANK_VARIABLES = tuple(rank for _, rank, _ in LAUNCHER_ENV) + ("HVD_LLAMA_LAUNCHER_PID",)


class OneProcess:
    """The ranks of a job of one process started without a launcher (no Horovod): what prepare, evaluation and
    the checkpoint code need of hvd_llama.parallel, which a launched job passes instead."""

    @staticmethod
    def rank() -> int:
        return 0

    @staticmethod
    def size() -> int:
        return 1

    @staticmethod
    def is_main() -> bool:
        return True

    @staticmethod
    def allreduce_sum(values, name: str):
        return values.double().cpu()  # parallel.allreduce_sum's float64 on the CPU

    @staticmethod
    def allgather_object(obj, name: str) -> list:
        return [obj]

    @staticmethod
    def broadcast_object(obj, name: str):
        return obj

    @staticmethod
    def run_on_main(fn, name: str):
        return fn()


def peak_rss(pid: int | str = "self") -> int:
    """The peak resident memory of a process (Linux's VmHWM), 0 where unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def _stat(pid: int) -> Optional[list[str]]:
    """The fields of /proc/PID/stat after the command name (field 3 onwards), or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def start_time(pid: int) -> Optional[int]:
    """When the process started (clock ticks since boot): with the pid, it names one process for good."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def parent_of(pid: int) -> Optional[int]:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def alive(pid: int, started: Optional[int]) -> bool:
    """Whether that very process still runs (a zombie counts as gone; so does a new process with its pid)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == started


def _is_launcher(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    names = [os.path.basename(a) for a in argv[:2]]  # a Python launcher script runs as `python /path/horovodrun`
    if any(name in LAUNCHERS for name in names):
        return True
    return names[0] in SHELLS and len(argv) > 2 and argv[1] == "-c" and \
        os.path.basename(argv[2].split(" ", 1)[0]) in LAUNCHERS


def launcher_processes() -> list[tuple[int, int]]:
    """(pid, start time) of what launched this process: its parent, any launcher above it (horovodrun's
    `sh -c mpirun` above mpirun), and the launch script that exported HVD_LLAMA_LAUNCHER_PID on this host.
    None for a process no launcher started: `nohup python -m hvd_llama.train ... &` outlives its shell."""
    if not any(name in os.environ for name in RANK_VARIABLES):
        return []
    chain, pid = [], os.getppid()
    while pid > 1:
        chain.append((pid, start_time(pid)))
        pid = parent_of(pid) or 0
        if not _is_launcher(pid):
            break
    script = os.environ.get("HVD_LLAMA_LAUNCHER_PID", "")
    if script.isdigit() and os.environ.get("HVD_LLAMA_LAUNCHER_HOST") == socket.gethostname():
        chain.append((int(script), start_time(int(script))))
    return [(pid, started) for pid, started in chain if started is not None]


def descendants(root: int) -> list[int]:
    """Every process below `root` now, parents before children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = parent_of(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(root: int, started: int) -> int:
    """SIGKILL `root` (if it is still that process) and everything below it; returns how many were killed.
    Stopped first, top-down, so that none of them can start another or escape by being re-parented."""
    if not alive(root, started):
        return 0
    victims = [root]
    for _ in range(2):  # a second pass catches what was started while the first one stopped them
        for pid in [root, *descendants(root)]:
            if pid not in victims:
                victims.append(pid)
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(victims)


def rank_name() -> str:
    """This rank's number from the launcher's variables (usable before, and without, Horovod)."""
    return next((os.environ[name] for name in RANK_VARIABLES[:4] if name in os.environ), "0")


def show(line: str, stream=None) -> None:
    """Print a line (on stdout by default) in a way that cannot fail. A rank's output is a pipe to its launcher;
    once the launcher is gone (SIGKILLed mpirun) writing raises BrokenPipeError, which must not crash the rank
    before it checkpoints. The stream then goes to /dev/null, so that no later write, nor the flush at exit,
    fails either."""
    stream = stream or sys.stdout
    try:
        print(line, file=stream, flush=True)
    except OSError:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, stream.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass


def say(line: str) -> None:
    """A line on stderr that cannot fail (see show)."""
    show(line, sys.stderr)


class StopFlag:
    """Whether to stop at the next step boundary, checkpointing first: the ranks agree on it there (one vote).

    Asked for by SIGTERM, SIGUSR1 or SIGINT (what schedulers, launchers and Ctrl-C send), by the stop file our
    launch scripts create on a signal (HVD_LLAMA_STOP_FILE: one rank seeing it is enough), or by the launcher's
    death (a watchdog thread polls the processes that started this one). From the request on, the rank has
    `grace_s` seconds to exit; after that it exits anyway (the previous checkpoint is intact: writes are atomic).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, grace_s: float, poll_s: float = 0.5):
        self.reason, self.since = "", 0.0
        self.grace_s, self.poll_s = grace_s, poll_s
        self.stop_file = os.environ.get("HVD_LLAMA_STOP_FILE", "")
        self.launchers = launcher_processes()
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        threading.Thread(target=self._watch, name="stop-watchdog", daemon=True).start()

    @property
    def requested(self) -> bool:
        if not self.reason and self.stop_file and os.path.exists(self.stop_file):
            self.request(f"the stop file {self.stop_file}")
        return bool(self.reason)

    def request(self, reason: str) -> None:
        if not self.reason:
            self.reason, self.since = reason, time.monotonic()

    def _handle(self, signum, frame):
        self.request(f"a signal ({signal.Signals(signum).name})")  # no I/O in a handler: the watchdog reports

    def _watch(self) -> None:
        announced = False
        while True:
            time.sleep(self.poll_s)
            gone = [pid for pid, started in self.launchers if not alive(pid, started)]
            if gone and not self.reason:
                self.request(f"the loss of the launcher (pid {gone[0]} is gone)")
            if self.reason and not announced:
                announced = True
                say(f"rank {rank_name()}: stop requested by {self.reason}; stopping at the next step boundary "
                     f"(grace {round(self.grace_s, 1):g} s: train.stop_grace_s)")
            if self.reason and time.monotonic() - self.since > self.grace_s:
                say(f"error: rank {rank_name()} still running {round(self.grace_s, 1):g} s after the stop request "
                     "(train.stop_grace_s): exiting now; the last checkpoint written is intact")
                os._exit(1)


@contextmanager
def reaped(proc: subprocess.Popen) -> Iterator[None]:
    """Kill `proc` and everything it started if the block raises (a timeout, Ctrl-C) or this process dies in it,
    however it dies: a reaper process watches a pipe only this process writes to.

    Killing a process group is not enough: launchers start ranks in sessions of their own (horovodrun's
    helpers, torchrun's workers), and a SIGKILLed parent runs no cleanup at all.
    """
    started = start_time(proc.pid)
    reaper = subprocess.Popen([sys.executable, "-S", __file__, str(proc.pid), str(started)], stdin=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        yield
    except BaseException:
        kill_tree(proc.pid, started)
        raise
    finally:
        reaper.communicate("done")


def reaper_main(argv: list[str]) -> None:
    """Wait for stdin to close; unless the parent wrote "done" first, kill the tree of PID (started START_TIME).
    The parent holds the only write end of that pipe, so it closes however the parent ends, SIGKILL included."""
    root, started = int(argv[0]), int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the group must not stop the reaper first
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.stdin.read().strip() != "done":
        killed = kill_tree(root, started)
        if killed:
            print(f"error: the process that started pid {root} is gone: killed {killed} process(es) of its tree",
                  file=sys.stderr, flush=True)


if __name__ == "__main__":
    reaper_main(sys.argv[1:])
