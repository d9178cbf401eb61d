"""Preemption and crashes under every launcher: SIGTERM, SIGUSR1 and SIGINT to the launcher alone or to its whole
process group; SIGKILL of the launcher or of one rank. Each job must checkpoint at a step boundary where the
README's fault table says so, exit as it says, and leave no process behind."""
from __future__ import annotations

import itertools
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import micro_overrides
from jobkill import (LAUNCHERS, SCRIPTS, checkpoints, finish, job_processes, kill_all, last_step, output, ranks_of,
                     signal_job, start, survivors, wait_for)
from multiproc import finish_job, start_job
from trainrun import losses, train_args

pytestmark = pytest.mark.distributed

SIGNALS = {"TERM": signal.SIGTERM, "USR1": signal.SIGUSR1, "INT": signal.SIGINT}
TARGETS = ("launcher", "group")
CELLS = list(itertools.product(LAUNCHERS, SIGNALS, TARGETS))
FAST_CELLS = [("train_single_node.sh", "TERM", "group"), ("horovodrun", "TERM", "launcher")]
MAX_STEPS = 300


def expected_exit(launcher: str, sig: str) -> int | None:
    """The launcher's exit code (None: any failure code): the README's fault table."""
    if launcher in SCRIPTS:
        return 0  # the script stands between the signal and the launcher
    if launcher == "horovodrun":
        return -SIGNALS[sig]  # it is `sh -c mpirun`, killed by the signal; the ranks stop by themselves
    if launcher == "horovodrun-gloo":
        return -signal.SIGUSR1 if sig == "USR1" else 0  # it dies of SIGUSR1; its helpers SIGTERM the ranks
    return 0 if sig == "USR1" else None  # mpirun forwards SIGUSR1; on SIGTERM/SIGINT it kills the ranks in 2 s


def checkpoint_guaranteed(launcher: str, sig: str) -> bool:
    """Plain mpirun SIGKILLs the ranks 1 s after forwarding SIGTERM/SIGINT: only a small model saves in time."""
    return not (launcher == "mpirun" and sig != "USR1")


def overrides(data_dir):
    return micro_overrides(data_dir, **{"train.max_steps": MAX_STEPS, "checkpoint.every": 0, "log.tensorboard": False})


def check_cell(outcome, launcher, sig):
    assert not outcome.left, f"left running: {outcome.left}"
    expected = expected_exit(launcher, sig)
    if expected is None:
        assert outcome.returncode != 0, outcome.output[-3000:]
    else:
        assert outcome.returncode == expected, outcome.output[-3000:]
    assert outcome.stop_step < MAX_STEPS
    stop_checkpoint = f"step_{outcome.stop_step:08d}"
    if checkpoint_guaranteed(launcher, sig):
        assert outcome.checkpoints == [stop_checkpoint], outcome.output[-3000:]  # at the step it stopped
        assert "stop requested by" in outcome.output
    else:
        assert outcome.checkpoints in ([], [stop_checkpoint])  # complete when there is one


def run_cells(cells, data_dir, root):
    """Run cells side by side (the micro model's steps take milliseconds; start-up is most of a cell)."""
    def one(cell):
        launcher, sig, target = cell
        folder = root / "-".join(cell)
        folder.mkdir(parents=True)
        run_dir = folder / "run"
        outcome = signal_job(launcher, SIGNALS[sig], target, train_args(run_dir, overrides(data_dir)), run_dir, folder)
        outcome.folder = folder
        return outcome

    with ThreadPoolExecutor(4) as pool:
        return dict(zip(cells, pool.map(one, cells)))


@pytest.fixture(scope="module")
def straight_losses(data_dir, tmp_path_factory):
    """Losses of an uninterrupted 2-rank run: every resumed run must reproduce them exactly."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    job = finish_job(start_job(train_args(run_dir, overrides(data_dir))), timeout=180)
    assert job.returncode == 0, job.output[-3000:]
    return losses(run_dir)


@pytest.fixture(scope="module")
def matrix(data_dir, tmp_path_factory):
    return run_cells(CELLS, data_dir, tmp_path_factory.mktemp("matrix"))


def resumes_exactly(launcher, folder, data_dir, expected_losses):
    run_dir = folder / "run"
    proc = start(launcher, train_args(run_dir, overrides(data_dir), "--resume", "auto"), folder)
    assert finish(proc, timeout=180) == 0, output(proc)[-3000:]
    assert losses(run_dir) == expected_losses


@pytest.mark.parametrize("cell", FAST_CELLS, ids=["-".join(c) for c in FAST_CELLS])
def test_stop_signal_checkpoints_and_resumes_exactly(cell, data_dir, tmp_path, straight_losses):
    outcome = run_cells([cell], data_dir, tmp_path)[cell]
    check_cell(outcome, cell[0], cell[1])
    resumes_exactly(cell[0], tmp_path / "-".join(cell), data_dir, straight_losses)


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS, ids=["-".join(c) for c in CELLS])
def test_stop_signal_matrix(cell, matrix):
    check_cell(matrix[cell], cell[0], cell[1])


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_launcher_resumes_a_stopped_run_exactly(launcher, matrix, data_dir, straight_losses):
    sig = "USR1" if launcher == "mpirun" else "TERM"  # a cell with a guaranteed checkpoint
    cell = (launcher, sig, "group")
    assert matrix[cell].checkpoints
    resumes_exactly(launcher, matrix[cell].folder, data_dir, straight_losses)
