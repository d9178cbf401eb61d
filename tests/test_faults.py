"""Faults a long run meets: preemption signals, non-finite steps, corrupt checkpoints, a crashing rank."""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from support.jobkill import wait_for_step
from support.multiproc import finish_job, start_job
from support.trainrun import (
    interrupted_then_resumed,
    losses,
    metrics,
    micro_overrides,
    train_args,
    train_job,
    train_single,
)

from hvd_llama.cli import UserError
from hvd_llama.files import sha256_file
from hvd_llama.training.faults import Fault

pytestmark = pytest.mark.distributed


@pytest.mark.slow  # one process; every launcher's cells: test_preemption.py
def test_sigterm_to_one_process_checkpoints_exits_zero_and_resumes_exactly(data_dir, tmp_path):
    overrides = micro_overrides(data_dir, **{"train.max_steps": 100, "checkpoint.every": 0})
    stopped, stop_step, resumed_losses = interrupted_then_resumed(overrides, tmp_path, 0, None, signal.SIGTERM)
    assert stopped.returncode == 0, stopped.output[-3000:]
    assert "stop requested by a signal" in stopped.output
    assert 3 <= stop_step < 100
    assert (tmp_path / "stopped" / "checkpoints" / f"step_{stop_step:08d}" / "manifest.json").is_file()
    straight = tmp_path / "straight"
    done = finish_job(start_job(train_args(straight, overrides), np=0, launcher=None))
    assert done.returncode == 0, done.output[-3000:]
    assert resumed_losses == losses(straight)


@pytest.mark.slow
def test_nan_on_one_rank_is_skipped_by_both(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    job = train_job(run_dir, micro_overrides(data_dir), env={"HVD_LLAMA_FAULT": "nan:3:1"})
    assert job.returncode == 0, job.output[-3000:]
    skipped = [r["step"] for r in metrics(run_dir) if r["skipped"]]
    assert skipped == [3]
    assert "replicas identical" in job.output
    clean = tmp_path / "clean"
    assert train_job(clean, micro_overrides(data_dir)).returncode == 0
    # Skipping step 3 leaves the weights as they were after step 2, so step 4's loss differs from the
    # clean run's while steps 1-2 match.
    assert losses(run_dir)[:2] == losses(clean)[:2] and losses(run_dir)[3] != losses(clean)[3]


@pytest.mark.slow
def test_too_many_non_finite_steps_stop_with_a_message(data_dir, tmp_path):
    job = train_job(tmp_path / "run", micro_overrides(data_dir, **{"train.max_bad_steps": 0}),
                    env={"HVD_LLAMA_FAULT": "nan:2:0"}, timeout=60)
    assert job.returncode != 0
    assert "non-finite steps in a row at step 2" in job.output


def test_corrupt_newest_checkpoint_falls_back_to_previous(data_dir, tmp_path):
    overrides = micro_overrides(data_dir, **{"train.max_steps": 6, "checkpoint.every": 2, "checkpoint.keep": 0})
    run_dir = tmp_path / "run"
    assert train_single(run_dir, micro_overrides(data_dir, **{"train.max_steps": 4, "checkpoint.every": 2,
                                                              "checkpoint.keep": 0})).returncode == 0
    newest = run_dir / "checkpoints" / "step_00000004" / "model.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    resumed = train_single(run_dir, overrides, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000004 is corrupt" in resumed.stderr
    assert "resuming from" in resumed.stdout and "step_00000002" in resumed.stdout
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 7))


@pytest.mark.slow  # the fast set's save failure: test_a_non_os_error_in_one_ranks_save_reaches_every_rank[2]
def test_failed_checkpoint_write_keeps_the_previous_one(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = micro_overrides(data_dir, **{"train.max_steps": 4, "checkpoint.every": 2, "checkpoint.keep": 0})
    assert train_single(run_dir, overrides).returncode == 0
    more = micro_overrides(data_dir, **{"train.max_steps": 6, "checkpoint.every": 0})
    again = train_job(run_dir, more, "--resume", "auto", env={"HVD_LLAMA_FAULT": "diskfull:6:0"}, timeout=60)
    assert again.returncode != 0
    assert "writing checkpoint step_00000006 failed" in again.output and "step_00000004" in again.output
    assert again.output.count("error: writing checkpoint") == 2  # every rank stops, none is left waiting
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


@pytest.mark.parametrize("launcher", [pytest.param("horovodrun", marks=pytest.mark.slow), "mpirun"])
def test_crashing_rank_brings_the_job_down_with_its_name(data_dir, tmp_path, launcher):
    start = time.monotonic()
    job = train_job(tmp_path / "run", micro_overrides(data_dir, **{"train.max_steps": 50}), launcher=launcher,
                    env={"HVD_LLAMA_FAULT": "raise:3:1"}, timeout=90)
    assert job.returncode != 0
    assert time.monotonic() - start < 60
    assert "error: rank 1 failed: RuntimeError: injected fault at step 3" in job.output


def test_fault_spec_is_read_once_and_checked(monkeypatch):
    monkeypatch.setenv("HVD_LLAMA_FAULT", "diskfull:12:1")
    fault = Fault.from_env()
    monkeypatch.delenv("HVD_LLAMA_FAULT")  # read at start-up: a later change does not matter
    assert fault == Fault("diskfull", 12, 1) and not fault.at("nan", 12, 1) and fault.at("diskfull", 12, 1)
    assert not fault.at("diskfull", 12, 0)
    assert Fault.from_env() == Fault() and not Fault().at("nan", 0, 0)
    for bad in ("nan:3", "nan:three:1", "melt:3:1", "nan:3:1:2"):
        monkeypatch.setenv("HVD_LLAMA_FAULT", bad)
        with pytest.raises(UserError, match=f"HVD_LLAMA_FAULT={bad}: expected KIND:STEP:RANK"):
            Fault.from_env()


@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_a_non_os_error_in_one_ranks_save_reaches_every_rank(data_dir, tmp_path, stage):
    """Rank 1's part of a save raises a RuntimeError (as a CUDA out of memory or a zip writer error would): every rank
    stops with the same line instead of waiting for it, the staging folder goes, the earlier checkpoint stays."""
    run_dir = tmp_path / "run"
    overrides = micro_overrides(data_dir, **{"train.max_steps": 4, "checkpoint.every": 2, "checkpoint.keep": 0,
                                             "dist.zero_stage": stage})
    start = time.monotonic()
    job = train_job(run_dir, overrides, env={"HVD_LLAMA_FAULT": "saveerror:4:1"}, timeout=90)
    assert job.returncode != 0
    assert time.monotonic() - start < 60
    assert job.output.count("error: writing checkpoint step_00000004 failed (rank 1: RuntimeError") == 2
    assert "step_00000002, is intact" in job.output
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002"]  # no staging left


# A train_state.pt whose unpickling runs a command (its manifest's checksum rewritten to match, as anyone who can
# write the file can also do).
CRAFTED = """import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"progress": Payload()}, sys.argv[1])
"""


def test_a_crafted_train_state_is_refused_and_runs_nothing(micro_run, small_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(micro_run, run_dir)
    ckpt = run_dir / "checkpoints" / "step_00000003"
    marker = tmp_path / "pwned"
    script = tmp_path / "craft.py"
    script.write_text(CRAFTED)
    subprocess.run([sys.executable, str(script), str(ckpt / "train_state.pt"), str(marker)], check=True)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["train_state.pt"] = sha256_file(ckpt / "train_state.pt")
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    resumed = train_single(run_dir, micro_overrides(small_data, **{"train.max_steps": 5}), "--resume", "auto")
    assert resumed.returncode == 2
    last = resumed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "train_state.pt holds objects other than tensors" in last
    assert not marker.exists()


def test_start_up_removes_what_killed_saves_left_and_refuses_a_second_job(micro_run, small_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(micro_run, run_dir)
    checkpoints = run_dir / "checkpoints"
    for name in (".step_00000004.tmp-k1ll3d", ".step_00000003.old-4242"):  # a save killed mid-way, a swap cut short
        (checkpoints / name).mkdir()
        (checkpoints / name / "model.pt").write_bytes(b"x" * 1000)
    overrides = micro_overrides(small_data, **{"train.max_steps": 200, "checkpoint.every": 0})
    proc = start_job(train_args(run_dir, overrides, "--resume", "auto"), np=0, launcher=None)
    try:
        wait_for_step(run_dir, 5, proc)
        second = train_single(run_dir, overrides, "--resume", "auto", timeout=60)  # while the first one trains
    finally:
        proc.send_signal(signal.SIGTERM)
        first = finish_job(proc, timeout=60)
    assert second.returncode == 2 and f"{run_dir} is in use by another job (host " in second.stderr
    assert "removed 2 folder(s) left by interrupted saves" in first.output
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(".")) == []
