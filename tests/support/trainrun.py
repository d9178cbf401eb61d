"""Run the training command as users do and read back what it wrote."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from support import REPO
from support.jobkill import wait_for_step
from support.multiproc import finish_job, job_env, run_job, start_job

TRAIN_DIGESTS = Path(__file__).with_name("train_digests.py")  # trains, then prints parameter digests per rank


def micro_overrides(data_dir: Path, **extra) -> list:
    """--set values for a model small enough that a 2-rank step takes milliseconds."""
    values = {"data.dir": str(data_dir), "model.dim": 64, "model.n_layers": 2, "model.n_heads": 4,
              "model.n_kv_heads": 2, "model.vocab_size": 512, "model.max_seq_len": 64, "train.seq_len": 32,
              "train.batch_size": 4, "train.max_steps": 5, "train.eval_every": 0, "optim.warmup_steps": 2,
              "optim.lr": 3e-3, "optim.min_lr": 3e-4, "checkpoint.every": 0, "log.peak_flops": 1e11}
    values.update(extra)
    return [item for key, value in values.items() for item in ("--set", f"{key}={value}")]


def train_args(run_dir: Path, overrides: list, *more: str) -> list:
    return ["-m", "hvd_llama.train", "--run-dir", str(run_dir), *overrides, *more]


def train_single(run_dir: Path, overrides: list, *more: str, timeout: float = 120,
                 env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """The train command as one plain process; `env`: variables beside job_env's."""
    return subprocess.run([sys.executable, *train_args(run_dir, overrides, *more)], cwd=REPO, env=job_env(env),
                          capture_output=True, text=True, timeout=timeout)


def train_job(run_dir: Path, overrides: list, *more: str, np: int = 2, launcher: str = "horovodrun",
              timeout: float = 180, env=None):
    return run_job(train_args(run_dir, overrides, *more), np=np, launcher=launcher, timeout=timeout, env=env)


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list:
    return [r["loss"] for r in metrics(run_dir) if "loss" in r]  # step 0 may hold validation only


def stopped_copy(run_dir: Path, dest: Path, at_step: int) -> Path:
    """A copy of a finished run as if it had stopped right after its checkpoint at `at_step`: later
    checkpoints gone, the metrics of later steps stale (a resume must replace them)."""
    shutil.copytree(run_dir, dest)
    for ckpt in (dest / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[1]) > at_step:
            shutil.rmtree(ckpt)
    return dest


def interrupted_then_resumed(overrides, tmp_path, np, launcher, sig):
    """Send `sig` mid-run; return (exit code, step it stopped at, the resumed run's losses)."""
    run_dir = tmp_path / "stopped"
    proc = start_job(train_args(run_dir, overrides), np=np, launcher=launcher)
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(sig)
    stopped = finish_job(proc, timeout=60)
    stop_step = metrics(run_dir)[-1]["step"]
    resumed = finish_job(start_job(train_args(run_dir, overrides, "--resume", "auto"), np=np, launcher=launcher))
    assert resumed.returncode == 0, resumed.output[-3000:]
    return stopped, stop_step, losses(run_dir)
