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
import torch
from support import REPO
from support.files import executable
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
    wait_for_step,
)
from support.models import MICRO, tiny_model
from support.trainrun import metrics, micro_overrides

from hvd_llama.parallel.elastic import ElasticState, host_copy

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


@pytest.mark.distributed
@pytest.mark.slow
def test_killed_worker_rolls_back_then_its_host_returns_and_another_leaves(data_dir, tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("".join(f"{host}:1\n" for host in HOSTS))
    discovery = executable(tmp_path / "discover.sh", f"#!/bin/sh\ncat {hosts}\n")
    run_dir = tmp_path / "run"
    overrides = micro_overrides(data_dir, **{"train.max_steps": MAX_STEPS, "dist.commit_every": COMMIT_EVERY,
                                             "dist.threads_per_rank": 1})
    proc = start_command([str(REPO / "launch" / "train_elastic.sh"), "-n", "3", "--min-np", "2", "--max-np", "3",
                          "-i", "lo", "-d", str(discovery), "--cooldown", "1", "1", "--",
                          "--run-dir", str(run_dir), *overrides], tmp_path / "job.log", GLOO_TIMEOUT)
    processes = []  # every process the job had (the workers run in sessions of their own)
    try:
        wait_for_step(run_dir, KILL_AFTER, proc)
        processes += job_processes(proc)
        workers = {int(spawn_env(pid)["HOROVOD_RANK"]): pid for pid in ranks_of(processes)}
        killed_host, killed_at = spawn_env(workers[0])["HOROVOD_HOSTNAME"], last_step(run_dir)
        os.kill(workers[0], signal.SIGKILL)  # the coordinator, which writes the log: another process takes over
        wait_for(lambda: "elastic reset: 2 ranks now" in output(proc), "the reset to 2 workers", proc=proc)
        hold(workers[2], 3)  # rank 1 now: rank 0 receives the launcher's notice that the killed host is back
        wait_for(lambda: "elastic reset: 3 ranks now" in output(proc), "the killed host's return", proc=proc)
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


# Elastic commits in host memory (parallel/elastic.py), checked in this process: what a rollback restores.
def test_elastic_commits_are_host_copies_and_restore_puts_them_back():
    model = tiny_model(MICRO)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train_once():
        model(torch.randint(0, 512, (2, 8))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    train_once()  # some optimizer state to commit
    state = ElasticState(model, optimizer, progress={"step": 1, "samples": 2})
    state.save()  # commit() = save() + a collective check for host changes
    committed_model, committed_optimizer = state._committed
    for name, tensor in committed_model.items():
        assert tensor.device.type == "cpu" and tensor.data_ptr() != model.state_dict()[name].data_ptr()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v["exp_avg"].clone() for k, v in optimizer.state_dict()["state"].items()}
    for _ in range(2):  # train, roll back, train again, roll back: the second rollback must find the same commit
        train_once()
        state.progress = {"step": 2, "samples": 4}
        assert not torch.equal(model.output.weight, weights["output.weight"])
        state.restore()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
        assert all(torch.equal(optimizer.state_dict()["state"][k]["exp_avg"], v) for k, v in moments.items())
        assert state.progress == {"step": 1, "samples": 2}  # the data position is a committed value too
    # The next commit reuses the host buffers of the last one, with the new values.
    train_once()
    state.save()  # commit() = save() + a collective check for host changes
    assert all(state._committed[0][k] is tensor for k, tensor in committed_model.items())
    assert torch.equal(state._committed[0]["output.weight"], model.output.weight.detach())
    assert state._committed[1]["state"][0]["exp_avg"] is committed_optimizer["state"][0]["exp_avg"]


def test_host_copy_keeps_the_structure():
    tree = {"a": torch.ones(2), "b": [torch.zeros(3), 4, "x"], "c": (torch.arange(2), None)}
    copied = host_copy(tree)
    assert copied["b"][1:] == [4, "x"] and copied["c"][1] is None and isinstance(copied["c"], tuple)
    assert torch.equal(copied["a"], tree["a"]) and copied["a"].data_ptr() != tree["a"].data_ptr()
    tree["a"].add_(1)
    assert torch.equal(copied["a"], torch.ones(2))  # a copy, not a view
    again = host_copy({"a": torch.full((3,), 5.0), "b": [torch.ones(3), 5, "y"], "c": (torch.arange(2), None)}, copied)
    assert again["a"].shape == (3,) and again["b"][0] is copied["b"][0] and torch.equal(again["b"][0], torch.ones(3))
