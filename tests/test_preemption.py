"""Preemption and crashes under every launcher: SIGTERM, SIGUSR1 and SIGINT to the launcher alone or to its whole
process group; SIGKILL of the launcher or of one rank. Each job must checkpoint at a step boundary where the
README's fault table says so, exit as it says, and leave no process behind."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from support import REPO
from support.jobkill import LAUNCHERS, SCRIPTS, finish, job_processes, output, signal_job, start, survivors, wait_for
from support.multiproc import finish_job, job_env, start_job
from support.trainrun import losses, micro_overrides, train_args

from hvd_llama import procs
from hvd_llama.procs import StopFlag

pytestmark = pytest.mark.distributed

SIGNALS = {"TERM": signal.SIGTERM, "USR1": signal.SIGUSR1, "INT": signal.SIGINT, "KILL": signal.SIGKILL}
# Our scripts handle every signal, to the script alone or to its group, with one trap (launch/hosts.sh,
# run_supervised): train_single_node.sh runs every signal to the script, the others SIGTERM; of the group cells
# each script runs SIGTERM (the cell it resumes from), which keeps the suite's time in bounds.
STOP_CELLS = [cell for cell in itertools.product(LAUNCHERS, ("TERM", "USR1", "INT"), ("launcher", "group"))
              if cell[0] not in SCRIPTS or cell[2] == "launcher" and
              (cell[0] == "train_single_node.sh" or cell[1] == "TERM")]
KILL_CELLS = [(launcher, "KILL", "launcher") for launcher in LAUNCHERS] + \
    [(launcher, "KILL", "rank") for launcher in ("horovodrun", "horovodrun-gloo", "mpirun", "train_single_node.sh")]
# train_elastic.sh execs horovodrun (Gloo, elastic), which stands between the signal and the ranks (they run in
# sessions of their own): a signal to its group acts as one to it alone, and its driver handles SIGINT as
# SIGTERM (gloo_run.register_shutdown_event). So: a scheduler's SIGTERM, SIGUSR1 (fatal to it), SIGKILL.
ELASTIC_CELLS = [("train_elastic.sh", "TERM", "group"), ("train_elastic.sh", "USR1", "launcher"),
                 ("train_elastic.sh", "KILL", "launcher")]
# Cells run on their own and then resumed. mpirun-KILL-launcher is in the fast set: with mpirun gone, the ranks'
# output is a broken pipe (log.every=1 writes to it each step).
RESUMED_CELLS = [("train_single_node.sh", "TERM", "group"), ("mpirun", "KILL", "launcher")]
MAX_STEPS = 150  # stops come by step 25 here: headroom for a faster machine


def expected_exit(launcher: str, sig: str, target: str) -> int | set | None:
    """The launcher's exit code, or the set of codes it may give (None: a failure code): the README's table."""
    if sig == "KILL":
        return -signal.SIGKILL if target == "launcher" else None
    if launcher in SCRIPTS:
        return 0  # the script stands between the signal and the launcher
    if launcher == "horovodrun":
        return -SIGNALS[sig]  # `sh -c mpirun` dies of it (of SIGINT once mpirun is gone); the ranks stop
    if launcher == "train_elastic.sh":  # it dies of SIGUSR1; on SIGTERM/SIGINT the elastic driver SIGTERMs the
        return -signal.SIGUSR1 if sig == "USR1" else 0  # ranks, which checkpoint and leave within its 5 s
    if launcher == "horovodrun-gloo":  # it dies of SIGUSR1; on SIGTERM/SIGINT its own shutdown SIGKILLs the
        return -signal.SIGUSR1 if sig == "USR1" else {0, 1}  # shells that started the ranks, and may report that
    return 0 if sig == "USR1" else None  # mpirun forwards SIGUSR1; on SIGTERM/SIGINT it kills the ranks in 2 s


def checkpoint_guaranteed(launcher: str, sig: str, target: str) -> bool:
    """A checkpoint at the step the job stopped, whatever the model's size: not when a rank dies (the job fails;
    earlier checkpoints stay), nor where mpirun SIGKILLs the ranks 2 s after SIGTERM/SIGINT reached it (plain
    mpirun, and horovodrun's MPI mode when the whole group is signalled): only a small model saves in time."""
    if target == "rank":
        return False
    return not (sig in ("TERM", "INT") and (launcher == "mpirun" or (launcher == "horovodrun" and target == "group")))


def output_relayed(launcher: str, sig: str) -> bool:
    """Whether the ranks' output still reaches us: not when the process that relays it (mpirun, horovodrun
    --gloo, train_elastic.sh's horovodrun) was killed; horovodrun's MPI mode and our other scripts leave mpirun
    running."""
    return not (launcher in ("mpirun", "horovodrun-gloo", "train_elastic.sh") and sig == "KILL" or
                launcher in ("horovodrun-gloo", "train_elastic.sh") and sig == "USR1")


def ignored(launcher: str, sig: str, target: str) -> bool:
    """horovodrun's MPI mode is `sh -c mpirun`: a shell waiting for its command defers SIGINT until it ends."""
    return (launcher, sig, target) == ("horovodrun", "INT", "launcher")


def overrides(data_dir, **extra):
    return micro_overrides(data_dir, **{"train.max_steps": MAX_STEPS, "checkpoint.every": 0, "log.tensorboard": False,
                                        "train.stop_grace_s": 30, **extra})


def check_cell(outcome, launcher, sig, target):
    if isinstance(outcome, Exception):
        raise outcome
    assert not outcome.left, f"left running 60 s after the launcher ended: {outcome.left}"
    assert outcome.seconds < 60
    if ignored(launcher, sig, target):  # then stopped with SIGUSR1 to the group
        assert "still running" in outcome.output
        sig, target = "USR1", "group"
    expected = expected_exit(launcher, sig, target)
    if expected is None:
        assert outcome.returncode != 0, outcome.output[-3000:]
    elif isinstance(expected, set):
        assert outcome.returncode in expected, outcome.output[-3000:]
    else:
        assert outcome.returncode == expected, outcome.output[-3000:]
    assert outcome.stop_step < MAX_STEPS and not outcome.corrupt
    stop_checkpoint = f"step_{outcome.stop_step:08d}"
    if checkpoint_guaranteed(launcher, sig, target):
        assert outcome.checkpoints == [stop_checkpoint], outcome.output[-3000:]  # at the step it stopped
        if output_relayed(launcher, sig):
            assert "stop requested by" in outcome.output
    elif target == "rank":  # checkpoint.every=2: the ones written before the kill are intact
        assert outcome.checkpoints and outcome.checkpoints[-1] <= stop_checkpoint
    else:
        assert outcome.checkpoints in ([], [stop_checkpoint])


def run_cells(cells, data_dir, root):
    """Run cells side by side (the micro model's steps take milliseconds; start-up is most of a cell)."""
    def one(cell):
        launcher, sig, target = cell
        folder = root / "-".join(cell)
        folder.mkdir(parents=True)
        run_dir = folder / "run"
        # every step on the console: a rank whose launcher is gone writes to a broken pipe before it stops
        more = {"log.every": 1, **({"checkpoint.every": 2} if target == "rank" else {})}
        outcome = signal_job(launcher, SIGNALS[sig], target, train_args(run_dir, overrides(data_dir, **more)),
                             run_dir, folder, at_step=5 if target == "rank" else 3,
                             then=signal.SIGUSR1 if ignored(*cell) else None)
        outcome.folder = folder
        return outcome

    def guarded(cell):  # a failing cell fails its own test, not the others'
        try:
            return one(cell)
        except Exception as err:  # noqa: BLE001 (re-raised by check_cell)
            return err

    with ThreadPoolExecutor(4) as pool:
        return dict(zip(cells, pool.map(guarded, cells)))


@pytest.fixture(scope="module")
def straight_losses(data_dir, tmp_path_factory):
    """Losses of an uninterrupted 2-rank run: every resumed run must reproduce them exactly."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    job = finish_job(start_job(train_args(run_dir, overrides(data_dir))), timeout=180)
    assert job.returncode == 0, job.output[-3000:]
    return losses(run_dir)


def resume_cell(launcher: str) -> tuple:
    return launcher, "USR1" if launcher == "mpirun" else "TERM", "group"  # a cell with a guaranteed checkpoint


@pytest.fixture(scope="module")
def matrix(request, data_dir, tmp_path_factory):
    """The outcome of every cell the selected tests need, run side by side."""
    cells = []
    for item in request.session.items:
        params = getattr(item, "callspec", None) and item.callspec.params
        if params and "matrix" in item.fixturenames and ("cell" in params or "launcher" in params):
            cell = params["cell"] if "cell" in params else resume_cell(params["launcher"])
            cells += [cell] if cell not in cells else []
    return run_cells(cells, data_dir, tmp_path_factory.mktemp("matrix"))


def resume(launcher, folder, data_dir) -> tuple:
    """`--resume auto` the run in `folder` to the end: (exit code, output, the run's losses)."""
    run_dir = folder / "run"
    proc = start(launcher, train_args(run_dir, overrides(data_dir), "--resume", "auto"), folder)
    returncode = finish(proc, timeout=180)
    return returncode, output(proc), losses(run_dir) if returncode == 0 else None


def resumes_exactly(resumed: tuple, expected_losses) -> None:
    returncode, printed, resumed_losses = resumed
    assert returncode == 0, printed[-3000:]
    assert resumed_losses == expected_losses


@pytest.mark.parametrize("cell", [pytest.param(c, id="-".join(c), marks=[pytest.mark.slow] if c[0] in SCRIPTS else [])
                                  for c in RESUMED_CELLS])
def test_stop_signal_checkpoints_and_resumes_exactly(cell, data_dir, tmp_path, straight_losses):
    outcome = run_cells([cell], data_dir, tmp_path)[cell]
    check_cell(outcome, *cell)
    resumes_exactly(resume(cell[0], tmp_path / "-".join(cell), data_dir), straight_losses)


MATRIX_CELLS = [cell for cell in STOP_CELLS + KILL_CELLS + ELASTIC_CELLS if cell not in RESUMED_CELLS]


@pytest.mark.slow
@pytest.mark.parametrize("cell", MATRIX_CELLS, ids=["-".join(c) for c in MATRIX_CELLS])
def test_signal_and_kill_matrix(cell, matrix):
    check_cell(matrix[cell], *cell)


@pytest.fixture(scope="module")
def resumed(matrix, data_dir):
    """Every launcher's resume of its stopped run (the cells with a guaranteed checkpoint), side by side."""
    stopped = [cell for cell in map(resume_cell, LAUNCHERS)
               if cell in matrix and not isinstance(matrix[cell], Exception)]
    with ThreadPoolExecutor(3) as pool:
        return dict(zip(stopped, pool.map(lambda cell: resume(cell[0], matrix[cell].folder, data_dir), stopped)))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_launcher_resumes_a_stopped_run_exactly(launcher, matrix, resumed, straight_losses):
    cell = resume_cell(launcher)
    check_cell(matrix[cell], *cell)
    resumes_exactly(resumed[cell], straight_losses)


# The grace test: the README's plain commands (plain mpirun, horovodrun's MPI mode) in a shell that sourced the venv's
# activate as launch/install.sh leaves it, with a save the drill slows to several seconds. Open MPI's default would
# SIGKILL the ranks in the middle of it: mpirun forwards a SIGTERM 1 s after the signal came, SIGKILL 1 s later.
SAVE_DELAY_S = 3
MPI_GRACE_S = 15  # what the installer writes for this test's venv (its default, 60 s, makes mpirun take 2 minutes)
# Ctrl-C of mpirun: the ranks learn of it when mpirun forwards its SIGTERM; a scheduler's SIGTERM to horovodrun's
# group: its `sh -c mpirun` dies and the ranks see their launcher gone at once, while mpirun counts down.
GRACE_CELLS = [("mpirun", "INT"), ("horovodrun", "TERM")]


@pytest.fixture(scope="module")
def activate(tmp_path_factory):
    """A venv's activate script after launch/install.sh (a stand-in venv: nothing is built)."""
    from support.installer import fake_venv, install
    root = tmp_path_factory.mktemp("venv")
    venv = fake_venv(root, torch_cuda=None)
    (venv / "bin" / "activate").write_text("# the venv's activate script\n")
    done = install(root, {"nvcc"}, venv=venv, HVD_LLAMA_MPI_STOP_GRACE_S=str(MPI_GRACE_S))
    assert done.returncode == 0, done.stderr
    return venv / "bin" / "activate"


@pytest.mark.slow  # ~30 s a cell: Open MPI waits twice its 15 s sigkill timeout
@pytest.mark.parametrize("cell", GRACE_CELLS, ids=["-".join(c) for c in GRACE_CELLS])
def test_plain_commands_in_the_venv_give_a_slow_save_its_time(cell, activate, data_dir, tmp_path):
    launcher, sig = cell
    run_dir = tmp_path / "run"
    # train.stop_grace_s as the plain command has it (the default: sized from the checkpoint). log.every=10: mpirun
    # relays no output while it counts down; a rank printing every step would fill the pipe (some 20 KB) and block
    # before it reaches the step boundary.
    args = train_args(run_dir, micro_overrides(data_dir, **{"train.max_steps": 100_000, "log.tensorboard": False,
                                                            "log.every": 10}))
    # a user's shell: without the suite's pin of Open MPI's default (multiproc.job_env), then the venv's activate
    shell = ["bash", "-c", 'unset OMPI_MCA_odls_base_sigkill_timeout; source "$0" && exec "$@"', str(activate)]
    outcome = signal_job(launcher, SIGNALS[sig], "group", args, run_dir, tmp_path,
                         env={"HVD_LLAMA_SAVE_DELAY_S": str(SAVE_DELAY_S)}, shell=shell)
    stop_checkpoint = f"step_{outcome.stop_step:08d}"
    assert outcome.checkpoints == [stop_checkpoint] and not outcome.corrupt, (outcome.returncode, outcome.seconds,
                                                                              outcome.output[-3000:])
    assert f"saved {run_dir / 'checkpoints' / stop_checkpoint} at step {outcome.stop_step}" in outcome.output
    assert "exiting now" not in outcome.output and "signal 9" not in outcome.output  # no rank gave up or was killed
    assert not outcome.left
    assert outcome.returncode == (1 if launcher == "mpirun" else -SIGNALS[sig])  # as without the grace


REAPED_TREE = """
import subprocess, sys, time
from hvd_llama import procs
from hvd_llama.procs import StopFlag
job = subprocess.Popen(["sh", "-c", "setsid sleep 300 & sleep 300"], start_new_session=True)
with procs.reaped(job):
    print(job.pid, flush=True)
    time.sleep(300)
"""


def test_reaped_tree_dies_with_its_parent_even_by_sigkill():
    """A grandchild in a session of its own (as horovodrun's helpers and torchrun's workers are) goes too."""
    parent = subprocess.Popen([sys.executable, "-c", REAPED_TREE], stdout=subprocess.PIPE, text=True, env=job_env())
    root = int(parent.stdout.readline())
    def sessions():  # the background sleep calls setsid() a moment after it is forked
        return {os.getsid(pid) for pid in [root, *procs.descendants(root)]}
    wait_for(lambda: len(procs.descendants(root)) >= 2 and len(sessions()) == 2, "the tree's start", timeout=30,
             proc=parent)
    tree = [(pid, procs.start_time(pid), "") for pid in [root, *procs.descendants(root)]]
    parent.kill()
    parent.wait()
    assert not survivors(tree, timeout=30)


def test_bench_killed_leaves_no_process(tmp_path):
    """SIGKILL of `python -m hvd_llama.bench` while its horovodrun job measures: the job goes too."""
    argv = [sys.executable, "-m", "hvd_llama.bench", "scaling", "--config", "configs/tiny.yaml", "--set",
            "model.dim=64", "--set", "model.n_layers=2", "--set", "model.vocab_size=512", "--set", "train.seq_len=32",
            "--set", "train.batch_size=4", "--steps", "1000000", "--rounds", "1", "--out", str(tmp_path / "r.json")]
    bench = subprocess.Popen(argv, cwd=REPO, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        wait_for(lambda: any(cmd.startswith(sys.executable) and "horovodrun" not in cmd and "train_steps" in cmd
                             for _, _, cmd in job_processes(bench)), "a measurement rank", proc=bench)
        processes = [p for p in job_processes(bench) if p[0] != bench.pid]
        assert len({os.getsid(pid) for pid, _, _ in processes}) >= 2  # horovodrun's helpers: sessions of their own
        bench.kill()
        bench.wait()
        left = survivors(processes)
        assert not left, f"left running: {left}"
        assert "killed" in bench.stderr.read()  # the reaper says what it did
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)


WAITING_RANK = """
import time
from hvd_llama.procs import StopFlag
flag = StopFlag(grace_s=1.0, poll_s=0.1)
print("ready", flush=True)
while True:  # a rank that never reaches a step boundary (stuck in a collective with a dead peer)
    time.sleep(0.1)
"""


@pytest.mark.parametrize("how", ["signal", "launcher gone"])
def test_a_rank_that_cannot_stop_exits_after_the_grace_period(how, tmp_path):
    """train.stop_grace_s: the rank exits with a message however the stop was asked for."""
    env = job_env({"OMPI_COMM_WORLD_RANK": "1"})  # a launched rank: it watches its launcher
    launcher = subprocess.Popen(["sh", "-c", f"'{sys.executable}' -c '{WAITING_RANK}'; echo unreachable"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert launcher.stdout.readline() == "ready\n"
        rank = procs.descendants(launcher.pid)[0]
        rank_started = procs.start_time(rank)
        os.kill(*((rank, signal.SIGTERM) if how == "signal" else (launcher.pid, signal.SIGKILL)))
        assert not survivors([(rank, rank_started, "")], timeout=10)
        stderr = launcher.stderr.read()
        reason = "a signal (SIGTERM)" if how == "signal" else "the loss of the launcher"
        assert f"rank 1: stop requested by {reason}" in stderr
        assert "error: rank 1 still running 1 s after the stop request (train.stop_grace_s)" in stderr
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)


def test_stop_file_requests_a_stop(tmp_path, monkeypatch):
    stop_file = tmp_path / "stop"
    monkeypatch.setenv("HVD_LLAMA_STOP_FILE", str(stop_file))
    flag = StopFlag(grace_s=60)
    try:
        assert not flag.requested
        stop_file.touch()
        assert flag.requested and flag.reason == f"the stop file {stop_file}"
    finally:
        flag.grace_s = float("inf")  # its watchdog thread must never end this test process
        for sig in StopFlag.SIGNALS:  # pytest's own handlers back
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
