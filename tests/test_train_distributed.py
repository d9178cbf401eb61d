"""Training across real processes: N ranks x batch b must equal 1 rank x batch N*b."""
import time

import pytest
from conftest import micro_overrides
from multiproc import run_job
from trainrun import losses, metrics, stopped_copy, train_job, train_single

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


CHECKSUMS = """
import hashlib, sys
from pathlib import Path
from hvd_llama import dist
from hvd_llama.config import load_config
from hvd_llama.metrics import MetricsLogger
from hvd_llama.train import Trainer, check_data

run_dir = Path(sys.argv[1])
cfg = load_config(None, sys.argv[2:])
check_data(cfg)
trainer = Trainer(cfg, run_dir, dist.init(cfg.dist, "cpu"))
trainer.resume(None)
trainer.run(MetricsLogger(run_dir, enabled=False, tensorboard=False, console_every=1))
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in trainer.model.parameters()))
print("CHECKSUM", digest.hexdigest())
"""


def test_all_ranks_hold_identical_parameters(data_dir, tmp_path):
    values = [v for v in micro_overrides(data_dir, **{"train.max_steps": 4}) if v != "--set"]
    script = tmp_path / "checksums.py"
    script.write_text(CHECKSUMS)

    job = run_job([str(script), str(tmp_path / "run"), *values], np=2)
    assert job.returncode == 0, job.output[-3000:]
    sums = [[l for l in job.lines(r) if l.startswith("CHECKSUM")][-1] for r in (0, 1)]
    assert sums[0] == sums[1]


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
