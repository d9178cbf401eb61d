"""What every benchmark shares: its measurement processes (started, logged, killed as a group on a timeout),
the run's context, and figures of the model and of a job's ranks."""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

import hvd_llama
from hvd_llama import procs
from hvd_llama.cli import read_json
from hvd_llama.config import Config
from hvd_llama.model import Transformer

PACKAGE_ROOT = Path(hvd_llama.__file__).resolve().parents[1]  # the folder this hvd_llama is imported from
MB = 1e6  # megabytes are decimal throughout (as prepare reports them)

PHASES = ("reduce_gradients", "clip_grad_norm_", "step")  # the optimizer's calls in train_step, after backward


class BenchFailure(RuntimeError):
    """A measurement process failed: the benchmark is recorded as failed and the others go on."""


def job_env(extra: Optional[dict] = None) -> dict:
    """Our environment, with this Python's scripts on PATH and this copy of hvd_llama importable."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def python_module(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


CONTROLLERS = ("gloo", "mpi")  # horovodrun --gloo, or horovodrun without it (mpirun underneath)


def horovodrun(np: int, command: Sequence[str], controller: str = "gloo", options: Sequence[str] = ()) -> list[str]:
    launcher = shutil.which("horovodrun", path=str(Path(sys.executable).parent)) or "horovodrun"
    gloo = ["--gloo"] if controller == "gloo" else []
    return [launcher, *gloo, "-np", str(np), "-H", f"localhost:{np}", *map(str, options), *command]


def torchrun(np: int, module: str, *args) -> list[str]:
    return python_module("torch.distributed.run", "--standalone", "--nproc-per-node", np, "-m", module, *args)


def run_logged(command: Sequence[str], log: Path, timeout: float, env: Optional[dict] = None) -> float:
    """Run a command with its output in `log`; returns its wall time. Its whole process tree goes on a timeout,
    Ctrl-C, or this process's death (even by SIGKILL), so no rank is left behind."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, env=job_env(env),
                                start_new_session=True)
        try:
            with procs.reaped(proc):
                returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.wait()
            raise BenchFailure(f"`{shlex.join(command)}` did not finish in {timeout:.0f} s "
                               f"(--timeout-s); its log: {log}") from None
    if returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise BenchFailure(f"`{shlex.join(command)}` exited with {returncode}; the end of its log:\n{tail}")
    return time.perf_counter() - start




def read_measurement(path: Path) -> dict:
    return read_json(path, "measurement")


@dataclass
class Bench:
    args: argparse.Namespace
    cfg: Config  # --config with --set: the model of throughput, scaling and generation
    work: Path  # measurement files, logs, prepared data, the quality run
    results: dict  # benchmark -> result so far (generation uses quality's checkpoint)

    def config_args(self, config: Optional[str] = None, sets: Sequence[str] = ()) -> list[str]:
        config = config or self.args.config
        return (["--config", config] if config else []) + [a for s in sets for a in ("--set", s)]

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.seq_len

    @property
    def threads(self) -> int:
        return self.args.threads or len(os.sched_getaffinity(0))

    def run(self, command: Sequence[str], log_name: str, env: Optional[dict] = None) -> float:
        return run_logged(command, self.work / "logs" / log_name, self.args.timeout_s, env)

    def horovod_ranks(self, np: int, name: str, config: Optional[str], sets: Sequence[str], env: dict,
                      warmup: int, steps: int, measurement: str = "horovod", controller: str = "gloo",
                      options: Sequence[str] = ()) -> list[dict]:
        """Run a train_steps measurement (horovod or memory) on np ranks under horovodrun (with its `options`);
        returns each rank's figures."""
        folder = self.work / name
        folder.mkdir(parents=True, exist_ok=True)
        command = python_module("hvd_llama.bench.train_steps", measurement, *self.config_args(config, sets),
                                "--warmup", warmup, "--steps", steps, "--json-dir", folder)
        self.run(horovodrun(np, command, controller, options), f"{name}.log", env)
        return [read_measurement(folder / f"rank{r}.json") for r in range(np)]


def flops_per_token(cfg: Config) -> float:
    with torch.device("meta"):  # counts only: no memory for the weights
        return Transformer(cfg.model).flops_per_token(cfg.train.seq_len)


def num_params(cfg: Config) -> int:
    with torch.device("meta"):
        return Transformer(cfg.model).num_params()


def job_step_s(ranks: list[dict], key: str = "step_s") -> float:
    """A job's step time: the slowest rank's median (every rank waits for the slowest in the allreduce)."""
    return max(statistics.median(r[key]) for r in ranks)



def table(headers: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """Aligned text table: the first column left-aligned, the others right-aligned."""
    cells = [list(map(str, headers))] + [list(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in cells]


def run_evaluate(b: Bench, checkpoint: Path, data: Optional[Path], name: str,
                 quantize: Optional[str] = None) -> dict:
    """hvd_llama.evaluate on a whole validation split, in one process."""
    out = b.work / f"{name}.json"
    b.run(python_module("hvd_llama.evaluate", "--checkpoint", checkpoint, *(["--data", data] if data else []),
                        *(["--quantize", quantize] if quantize else []), "--json", out), f"{name}.log")
    return read_measurement(out)
