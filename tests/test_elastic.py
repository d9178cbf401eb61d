"""Horovod Elastic on localhost: the job shrinks from 3 workers to 2 and still finishes correctly."""
import json
import time

import pytest
from conftest import micro_overrides
from multiproc import finish_job, start_job
from trainrun import metrics, train_args

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def wait_for(predicate, proc, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached before the job ended or timed out")


def last_step(run_dir):
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def test_shrinking_discovery_continues_on_two_workers(data_dir, tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost:3\n")
    discovery = tmp_path / "discover.sh"
    discovery.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discovery.chmod(0o755)
    run_dir = tmp_path / "run"
    commit_every = 5
    overrides = micro_overrides(data_dir, **{"train.max_steps": 400, "dist.commit_every": commit_every,
                                             "checkpoint.every": 0, "dist.threads_per_rank": 1})
    proc = start_job(train_args(run_dir, overrides, "--elastic"), np=3, launcher="horovodrun",
                     launcher_args=["--min-np", "2", "--max-np", "3", "--network-interfaces", "lo",
                                    "--host-discovery-script", str(discovery)])
    wait_for(lambda: last_step(run_dir) >= 20, proc)
    hosts.write_text("localhost:2\n")
    job = finish_job(proc, timeout=180)
    assert job.returncode == 0, job.output[-4000:]
    records = metrics(run_dir)
    steps = [r["step"] for r in records]
    assert steps[-1] == 400 and steps == sorted(set(steps))  # every step once, no rolled-back leftovers
    sizes = [r["world_size"] for r in records]
    assert sizes[0] == 3 and sizes[-1] == 2 and sizes == sorted(sizes, reverse=True)
    assert "elastic reset: 2 ranks now" in job.output
    assert "replicas identical" in job.output
    losses = [r["loss"] for r in records]
    assert losses[-1] < losses[0]
