"""Horovod Elastic with real processes on localhost: a worker is SIGKILLed and the others go on from the last
commit; its host comes back after the blacklist cooldown and the job grows again; a host the discovery script
drops leaves gracefully. One job does all three (each resize costs seconds)."""
import os
import re
import signal
import time
from pathlib import Path
from statistics import mean

import pytest
from support.jobkill import (
    finish,
    job_processes,
    kill_all,
    last_step,
    output,
    ranks_of,
    start_command,
    survivors,
    wait_for,
)
from support.multiproc import REPO
from support.trainrun import metrics, micro_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Horovod blacklists the host of a failed worker, every slot on it: each worker needs a host of its own. All
# three names resolve to 127.0.0.1, an address of this machine, so Horovod starts their workers without ssh.
HOSTS = ("localhost", "127.0.0.1", "127.1")
COMMIT_EVERY, MAX_STEPS, KILL_AFTER = 5, 100, 12
# A survivor blocked in a collective notices the dead worker when its connection breaks, or else after
# Horovod's Gloo timeout (30 s by default).
GLOO_TIMEOUT = {"HOROVOD_GLOO_TIMEOUT_SECONDS": "8"}
RESET = re.compile(r"elastic reset: (\d+) ranks now.*continuing from step (\d+)")


def spawn_env(pid: int) -> dict:
    """What Horovod told a worker when it started it (its rank then: resets renumber them later)."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def hold(pid: int, seconds: float) -> None:
    """Freeze a worker (the others wait for it in their next collective) while the launcher, on its own clock
    (host discovery every second, the blacklist cooldown), notices a host change: a micro model would
    otherwise finish its steps first."""
    os.kill(pid, signal.SIGSTOP)
    time.sleep(seconds)
    os.kill(pid, signal.SIGCONT)


def runs(values: list) -> list:
    """Where each run of equal values starts: [(index, value), ...]."""
    return [(i, v) for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def test_killed_worker_rolls_back_then_its_host_returns_and_another_leaves(data_dir, tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("".join(f"{host}:1\n" for host in HOSTS))
    discovery = tmp_path / "discover.sh"
    discovery.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discovery.chmod(0o755)
    run_dir = tmp_path / "run"
    overrides = micro_overrides(data_dir, **{"train.max_steps": MAX_STEPS, "dist.commit_every": COMMIT_EVERY,
                                             "dist.threads_per_rank": 1})
    proc = start_command([str(REPO / "launch" / "train_elastic.sh"), "-n", "3", "--min-np", "2", "--max-np", "3",
                          "-i", "lo", "-d", str(discovery), "--cooldown", "1", "1", "--",
                          "--run-dir", str(run_dir), *overrides], tmp_path / "job.log", GLOO_TIMEOUT)
    processes = []  # every process the job had (the workers run in sessions of their own)
    try:
        wait_for(lambda: last_step(run_dir) >= KILL_AFTER, proc, f"step {KILL_AFTER}")
        processes += job_processes(proc)
        workers = {int(spawn_env(pid)["HOROVOD_RANK"]): pid for pid in ranks_of(processes)}
        killed_host, killed_at = spawn_env(workers[0])["HOROVOD_HOSTNAME"], last_step(run_dir)
        os.kill(workers[0], signal.SIGKILL)  # the coordinator, which writes the log: another process takes over
        wait_for(lambda: "elastic reset: 2 ranks now" in output(proc), proc, "the reset to 2 workers")
        hold(workers[2], 3)  # rank 1 now: rank 0 receives the launcher's notice that the killed host is back
        wait_for(lambda: "elastic reset: 3 ranks now" in output(proc), proc, "the killed host's return")
        processes += job_processes(proc)
        returned = [pid for pid in ranks_of(processes) if pid not in workers.values()]
        assert [spawn_env(pid)["HOROVOD_HOSTNAME"] for pid in returned] == [killed_host]
        leaving = spawn_env(workers[2])["HOROVOD_HOSTNAME"]
        hosts.write_text("".join(f"{host}:1\n" for host in HOSTS if host != leaving))
        hold(workers[2], 2)  # still rank 1
        returncode = finish(proc, timeout=180)
    except BaseException:
        kill_all(processes + job_processes(proc))
        raise
    left = survivors(processes)
    kill_all(left)
    log = output(proc)
    assert returncode == 0, log[-4000:]
    assert not left, f"still running 60 s after the job ended: {left}"
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))  # every step once: no rolled-back leftovers
    starts = runs([r["world_size"] for r in records])
    assert [size for _, size in starts] == [3, 2, 3, 2], starts
    # Each reset continues from a commit, the one the log names: after the kill the last one before it.
    resumed = [index for index, _ in starts[1:]]  # index of a step = the step before it
    assert [(int(n), int(step)) for n, step in RESET.findall(log)] == list(zip([2, 3, 2], resumed)), log[-4000:]
    assert all(step % COMMIT_EVERY == 0 for step in resumed)
    assert killed_at - COMMIT_EVERY <= resumed[0] <= killed_at + COMMIT_EVERY
    assert "replicas identical" in log  # the returned worker received the weights too
    # The loss goes on where it was at each reset (a worker that lost the state would start over near the
    # first step's loss) and keeps falling.
    losses = [r["loss"] for r in records]
    for step in resumed:
        assert abs(losses[step] - mean(losses[step - 3:step])) < 0.3, (step, losses[step - 3:step + 1])
    assert losses[resumed[0]] < losses[0] - 0.4
    assert mean(losses[-10:]) < mean(losses[:10]) - 0.5
