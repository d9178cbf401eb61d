"""Training across real processes: N ranks x batch b must equal 1 rank x batch N*b."""
import time

import pytest
from conftest import micro_overrides
from multiproc import run_job
from trainrun import TRAIN_DIGESTS, losses, metrics, stopped_copy, train_job, train_single

pytestmark = pytest.mark.distributed


def test_two_ranks_equal_one_rank_with_double_batch(data_dir, tmp_path, launcher):
    single = train_single(tmp_path / "one", micro_overrides(data_dir, **{"train.batch_size": 8}))
    assert single.returncode == 0, single.stderr[-3000:]
    job = train_job(tmp_path / "two", micro_overrides(data_dir), launcher=launcher)
    assert job.returncode == 0, job.output[-3000:]
    two = losses(tmp_path / "two")
    assert len(two) == 5
    assert two == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert metrics(tmp_path / "two")[-1]["tokens"] == 5 * 2 * 4 * 32  # tokens of both ranks
    # CPU ranks get a background loop that does not take their cores (dist.CPU_HOROVOD_ENV)
    controller = "Gloo" if launcher == "horovodrun" else "MPI"
    assert f"Horovod {controller} controller, cycle 5 ms" in job.output


def test_all_ranks_hold_identical_parameters(data_dir, tmp_path):
    values = [v for v in micro_overrides(data_dir, **{"train.max_steps": 4}) if v != "--set"]
    job = run_job([str(TRAIN_DIGESTS), str(tmp_path / "run"), *values], np=2)
    assert job.returncode == 0, job.output[-3000:]
    sums = [[l for l in job.lines(r) if l.startswith("BASE")] for r in (0, 1)]
    assert len(sums[0]) == 1 and sums[0] == sums[1]


@pytest.mark.slow
def test_two_rank_resume_is_exact(data_dir, tmp_path):
    """Rank 1 has no optimizer state after a resume: it must receive rank 0's, not run a dummy step."""
    overrides = micro_overrides(data_dir, **{"train.max_steps": 6, "checkpoint.every": 3, "checkpoint.keep": 0})
    straight = tmp_path / "straight"
    assert train_job(straight, overrides).returncode == 0
    stopped = stopped_copy(straight, tmp_path / "stopped", at_step=3)
    job = train_job(stopped, overrides, "--resume", "auto")
    assert job.returncode == 0, job.output[-3000:]
    assert losses(stopped) == losses(straight)


def test_bad_config_stops_every_rank_quickly(data_dir, tmp_path, launcher):
    start = time.monotonic()
    job = train_job(tmp_path / "run", micro_overrides(data_dir, **{"model.n_kv_heads": 3}), launcher=launcher,
                    timeout=60)
    assert job.returncode != 0
    assert time.monotonic() - start < 30
    assert job.output.count("error: model:") == 2  # each rank says why
