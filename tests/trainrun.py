"""Run the training command as users do and read back what it wrote."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from multiproc import REPO, job_env, run_job

TRAIN_DIGESTS = Path(__file__).with_name("train_digests.py")  # trains, then prints parameter digests per rank


def train_args(run_dir: Path, overrides: list, *more: str) -> list:
    return ["-m", "hvd_llama.train", "--run-dir", str(run_dir), *overrides, *more]


def train_single(run_dir: Path, overrides: list, *more: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *train_args(run_dir, overrides, *more)], cwd=REPO, env=job_env(),
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
