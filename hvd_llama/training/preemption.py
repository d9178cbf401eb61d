"""How long stopping takes: the grace a rank gives itself after a stop request, what its launcher gives before it
kills, and the drill that slows a save to test both.

A stop must cover the step in flight and a checkpoint: a 7B run at ZeRO stages 1-2 writes ~80 GB of optimizer
slices and a 27 GB model.pt. train.stop_grace_s=0 sizes the grace from the checkpoint's bytes and the write speed
of the last save, which every save logs (metrics.jsonl, the console) and a resumed run reads back; before any
save is timed, from the parameter count at an assumed speed. Rank 0 warns when the launcher kills sooner than a
stop needs: SLURM (HVD_LLAMA_STOP_NOTICE_S, which launch/train_slurm.sbatch sets from its --signal), plain
Open MPI (odls_base_sigkill_timeout: 1 s by default) or horovodrun --gloo (5 s).
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Optional

from hvd_llama.cli import UserError
from hvd_llama.procs import StopFlag, say

MIN_GRACE_S = 60.0  # train.stop_grace_s=0 never gives less: the fixed default it replaced
ASSUMED_BYTES_PER_S = 200e6  # until a save is timed: a shared filesystem under load (the first save corrects it)
NOTICE_VARIABLE = "HVD_LLAMA_STOP_NOTICE_S"
DELAY_VARIABLE = "HVD_LLAMA_SAVE_DELAY_S"
SIGKILL_VARIABLE = "OMPI_MCA_odls_base_sigkill_timeout"
OPEN_MPI_DEFAULT_S = 1  # odls_base_sigkill_timeout's default (Open MPI 4)
GLOO_GRACE_S = 5  # horovodrun --gloo: horovod.runner's safe_shell_exec.GRACEFUL_TERMINATION_TIME_S, a constant


def format_bytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def estimated_checkpoint_bytes(total_params: int, trainable_params: int) -> int:
    """A checkpoint's size before one is written: fp32 weights, and for each trainable parameter AdamW's two fp32
    moments and an fp32 master copy (bf16 at stages 1-2; elsewhere the weights are the master: an upper bound)."""
    return 4 * total_params + 12 * trainable_params


@dataclass(frozen=True)
class StopBudget:
    """What a stop takes: the step in flight, then a checkpoint of `checkpoint_bytes` written at `bytes_per_s`."""
    checkpoint_bytes: int
    bytes_per_s: float
    measured: bool  # bytes_per_s was timed at a save (else it is ASSUMED_BYTES_PER_S)
    step_s: float = 0.0  # the longest step (validation included), the first of a session aside

    @property
    def needed_s(self) -> float:
        return self.step_s + self.checkpoint_bytes / self.bytes_per_s

    @property
    def grace_s(self) -> float:
        """train.stop_grace_s=0: twice what a stop needs (a request during a periodic save waits for it, a step and
        its own save; a filesystem's speed varies from save to save), and never less than MIN_GRACE_S."""
        return max(MIN_GRACE_S, 2 * self.needed_s)

    def describe(self) -> str:
        speed = "measured at the last save" if self.measured else "assumed: no save timed yet"
        return (f"about {self.needed_s:.0f} s: a step of {self.step_s:.1f} s and a checkpoint of "
                f"{format_bytes(self.checkpoint_bytes)} at {format_bytes(self.bytes_per_s)}/s, {speed}")


@dataclass(frozen=True)
class Notice:
    """The seconds a launcher leaves the ranks between its stop signal and SIGKILL."""
    seconds: float
    source: str  # who gives it, and why that many
    fix: str  # how to get more; {s} stands for the seconds to ask for


def env_seconds(env: Mapping[str, str], name: str, meaning: str, positive: bool) -> Optional[float]:
    """A number of seconds from the environment, None when unset; anything else is a one-line error."""
    text = env.get(name, "")
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 if positive else seconds >= 0):
        raise UserError(f"{name}={text}: expected {meaning}, a number {'>' if positive else '>='} 0")
    return seconds


def notice_override(env: Mapping[str, str]) -> Optional[float]:
    """HVD_LLAMA_STOP_NOTICE_S, the notice as the launch script or the user knows it: SLURM tells a job nothing of
    its --signal."""
    return env_seconds(env, NOTICE_VARIABLE, "the seconds between the stop signal and the kill", positive=True)


def save_delay_s(env: Mapping[str, str]) -> float:
    """HVD_LLAMA_SAVE_DELAY_S, a drill: every save waits that long before it writes anything (a slow filesystem)."""
    return env_seconds(env, DELAY_VARIABLE, "the seconds each save waits before writing", positive=False) or 0.0


def parse_ompi_info(text: str) -> Optional[tuple[int, str]]:
    """(value, source) of odls_base_sigkill_timeout from `ompi_info --parsable --param odls base --level 9`."""
    found = dict(re.findall(r"^mca:odls:base:param:odls_base_sigkill_timeout:(value|source):(.*)$", text, re.M))
    value = found.get("value", "")
    return (int(value), found.get("source", "unknown")) if value.isdigit() else None


def open_mpi_sigkill_timeout(env: Mapping[str, str]) -> Optional[tuple[int, str]]:
    """Open MPI's odls_base_sigkill_timeout and where it comes from: the environment (mpirun hands its -mca and
    OMPI_MCA_ settings to every rank, and to its daemons on other nodes), else what ompi_info reads (an
    mca-params.conf file, or the default). None without Open MPI's ompi_info."""
    value = env.get(SIGKILL_VARIABLE, "")
    if value.isdigit():
        return int(value), SIGKILL_VARIABLE
    try:
        out = subprocess.run(["ompi_info", "--parsable", "--param", "odls", "base", "--level", "9"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_ompi_info(out)


def launcher_notice(env: Mapping[str, str]) -> Optional[Notice]:
    """What this rank's launcher gives after its stop signal; None where nothing we know of bounds it: our launch
    scripts (the launcher never sees the signal), srun, a plain process."""
    override = notice_override(env)
    if override is not None:
        return Notice(override, f"the launcher ({NOTICE_VARIABLE}={override:g}, e.g. SLURM's --signal=USR1@"
                                f"{override:g})", "give the job a longer notice, e.g. #SBATCH --signal=USR1@{s} in "
                                                  f"launch/train_slurm.sbatch (and {NOTICE_VARIABLE}={{s}})")
    if "HVD_LLAMA_LAUNCHER_PID" in env or "SLURM_PROCID" in env:
        return None
    if "OMPI_COMM_WORLD_RANK" in env:  # mpirun, or horovodrun's MPI mode, which runs it
        seconds, source = open_mpi_sigkill_timeout(env) or (OPEN_MPI_DEFAULT_S, "default")
        return Notice(seconds, f"plain mpirun (odls_base_sigkill_timeout={seconds}, from {source})",
                      f"export {SIGKILL_VARIABLE}={{s}} before mpirun or horovodrun (the venv's activate sets "
                      f"{MIN_GRACE_S:.0f}: launch/install.sh), or start the job with a launch/ script")
    if "HOROVOD_GLOO_RENDEZVOUS_ADDR" in env:
        return Notice(GLOO_GRACE_S, f"horovodrun --gloo ({GLOO_GRACE_S} s, fixed in Horovod)",
                      "start the job with launch/train_single_node.sh or train_horovodrun_hosts.sh, which never let "
                      "horovodrun see the signal (an elastic job has no such way)")
    return None


def shortfall(budget: StopBudget, configured_s: float, notice: Optional[Notice]) -> Optional[str]:
    """The warning when a stop cannot finish: an explicit train.stop_grace_s, or the launcher's notice, shorter than
    the step in flight and a save take. None when both suffice."""
    if configured_s and configured_s < budget.needed_s:
        return (f"train.stop_grace_s={configured_s:g} is shorter than a stop needs ({budget.describe()}): a rank "
                "would give up before its checkpoint is written; set train.stop_grace_s=0 to size it from the "
                "checkpoint")
    if notice and notice.seconds < budget.needed_s:
        return (f"{notice.source} leaves the ranks {notice.seconds:g} s between its stop signal and SIGKILL, less "
                f"than a stop needs ({budget.describe()}): a stop would lose the steps since the last checkpoint; "
                + notice.fix.format(s=math.ceil(budget.grace_s)))
    return None


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


class StopTime:
    """Keeps a StopFlag's grace fitted to the run (train.stop_grace_s=0; an explicit value wins): train's loop
    reports each step's time and saves through it. Each save is timed, logged (metrics.jsonl's record of its step:
    save_s, save_bytes, save_bytes_per_s, stop_grace_s; a console line) and resizes the grace; rank 0 warns once
    when the launcher's notice or an explicit train.stop_grace_s is shorter than a stop needs.
    `delay_s` (HVD_LLAMA_SAVE_DELAY_S) is a drill's slow filesystem: every save waits that long before writing.
    `ranks` is hvd_llama.parallel (broadcast_object, is_main), or a stand-in for one process."""

    def __init__(self, flag: StopFlag, configured_s: float, budget: StopBudget, ranks, delay_s: float = 0.0):
        self.flag, self.configured_s, self.budget, self.ranks, self.delay_s = flag, configured_s, budget, ranks, delay_s
        self.steps, self.warned, self.notice, self.notice_known = 0, False, None, False
        self._resize()

    @classmethod
    def begin(cls, flag: StopFlag, configured_s: float, model, last_save: Optional[dict], ranks,
              delay_s: float = 0.0) -> "StopTime":
        """Every rank alike: the budget of the last save rank 0's metrics.jsonl records (a resumed run), else the
        model's estimated checkpoint at ASSUMED_BYTES_PER_S."""
        notice_override(os.environ)  # a bad HVD_LLAMA_STOP_NOTICE_S stops every rank here, before a collective
        last = ranks.broadcast_object(last_save, name="stop.last_save")
        if last:
            budget = StopBudget(last["save_bytes"], last["save_bytes_per_s"], measured=True)
        else:
            params = list(model.parameters())
            budget = StopBudget(estimated_checkpoint_bytes(sum(p.numel() for p in params),
                                                           sum(p.numel() for p in params if p.requires_grad)),
                                ASSUMED_BYTES_PER_S, measured=False)
        return cls(flag, configured_s, budget, ranks, delay_s)

    def stepped(self, seconds: float) -> None:
        """After each step. The first of a session is left out once a second is timed: it allocates, compiles."""
        self.steps += 1
        step_s = seconds if self.steps <= 2 else max(seconds, self.budget.step_s)
        self.budget = replace(self.budget, step_s=step_s)
        self._resize()
        self._check()

    def save(self, save: Callable[[], Optional[Path]], logger) -> Optional[Path]:
        """Run `save` (every rank), timed from before the drill's delay; returns what it returns."""
        start = time.perf_counter()
        time.sleep(self.delay_s)
        path = save()
        nbytes, seconds = self.ranks.broadcast_object((folder_bytes(path), time.perf_counter() - start)
                                                      if self.ranks.is_main() else None, name="stop.save")
        self.budget = replace(self.budget, checkpoint_bytes=nbytes, bytes_per_s=nbytes / seconds, measured=True)
        self._resize()
        logger.annotate_last({"save_s": seconds, "save_bytes": nbytes, "save_bytes_per_s": nbytes / seconds,
                              "stop_grace_s": self.flag.grace_s})
        if path is not None:
            how = "train.stop_grace_s" if self.configured_s else "sized from this save"
            logger.message(f"checkpoint {path.name}: {format_bytes(nbytes)} in {seconds:.2f} s "
                           f"({format_bytes(nbytes / seconds)}/s); stop grace {self.flag.grace_s:.0f} s ({how})")
        self._check()
        return path

    def _resize(self) -> None:
        if not self.configured_s and not self.flag.reason:  # a countdown under way keeps its length
            self.flag.grace_s = self.budget.grace_s

    def _check(self) -> None:
        """Rank 0, from the session's second step on (the first one's time is start-up's too)."""
        if self.warned or self.steps < 2 or not self.ranks.is_main():
            return
        if not self.notice_known:  # asked once: ompi_info may be run
            self.notice, self.notice_known = launcher_notice(os.environ), True
        warning = shortfall(self.budget, self.configured_s, self.notice)
        if warning:
            self.warned = True
            say(f"warning: {warning}")
