"""Training across real processes: N ranks x batch b must equal 1 rank x batch N*b."""
import time

import pytest
from support.multiproc import run_job
from support.trainrun import TRAIN_DIGESTS, losses, metrics, micro_overrides, stopped_copy, train_job, train_single

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
    # CPU ranks get a background loop that does not take their cores (parallel.CPU_HOROVOD_ENV)
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


@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_fp16_resume_gives_every_rank_the_saved_loss_scale(data_dir, tmp_path, stage):
    """A non-finite step (on rank 1) halves the loss scale; a resumed run must continue at the halved scale on
    every rank: a rank back at 2^16 would scale its loss by its own factor and unscale the averaged gradient by it."""
    overrides = micro_overrides(data_dir, **{"train.precision": "fp16", "train.max_steps": 8, "checkpoint.every": 4,
                                             "checkpoint.keep": 0, "dist.zero_stage": stage})
    straight = tmp_path / "straight"
    job = train_job(straight, overrides, env={"HVD_LLAMA_FAULT": "nan:2:1"})
    assert job.returncode == 0, job.output[-3000:]
    assert [r["loss_scale"] for r in metrics(straight)][:3] == [2.0**16, 2.0**15, 2.0**15]
    stopped = stopped_copy(straight, tmp_path / "stopped", at_step=4)
    resumed = train_job(stopped, overrides, "--resume", "auto")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "replicas identical" in resumed.output
    assert losses(stopped) == losses(straight)


@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow), 2])
def test_tied_embeddings_train_at_every_stage(data_dir, tmp_path, stage):
    """Ranks > 0 allocate their model from the meta device, which unties the output head: their parameter lists
    differed from rank 0's (stage 0: other Horovod groups; stages 1-2: another flat layout)."""
    tied = {"model.tie_embeddings": "true", "dist.zero_stage": stage}
    single = train_single(tmp_path / "one", micro_overrides(data_dir, **tied, **{"train.batch_size": 8}))
    assert single.returncode == 0, single.stderr[-3000:]
    job = train_job(tmp_path / "two", micro_overrides(data_dir, **tied))
    assert job.returncode == 0, job.output[-3000:]
    assert "replicas identical" in job.output
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
