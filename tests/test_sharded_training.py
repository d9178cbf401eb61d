"""ZeRO stages 1 and 2 through the training application (issue 15): the same losses as stage 0, sharded
checkpoints that reshard across world sizes, bf16 master weights, and the memory check at start-up."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from support import REPO
from support.multiproc import job_env
from support.trainrun import (
    interrupted_then_resumed,
    losses,
    metrics,
    micro_overrides,
    stopped_copy,
    train_job,
    train_single,
)

from hvd_llama.use.inference import load_model
from hvd_llama.weights import checkpoint

pytestmark = pytest.mark.distributed


def values(data, **extra) -> list:
    """Clipping active from the first step (0.3), two micro-steps, buckets small enough that the micro model
    spans several (each padded to the world size)."""
    return micro_overrides(data, **{"train.batch_size": 3, "train.grad_accum": 2, "optim.grad_clip": 0.3,
                                    "dist.zero_bucket_elements": 20000, **extra})


def run_stages(data, tmp_path, np, launcher) -> dict:
    runs = {}
    for stage in (0, 1, 2):
        job = train_job(tmp_path / f"stage{stage}", values(data, **{"dist.zero_stage": stage}), np=np,
                        launcher=launcher)
        assert job.returncode == 0, job.output[-3000:]
        assert "replicas identical" in job.output  # every rank's parameters, compared by fingerprint
        runs[stage] = losses(tmp_path / f"stage{stage}")
    return runs


@pytest.mark.slow
def test_sharded_stages_train_like_stage_0(small_data, tmp_path):
    """Over mpirun: the reduce-scatter path. (Over Gloo, at np=2 and at np=3 with a parameter count that is not
    a multiple of 3: tests/test_zero.py; Gloo training at stage 2: the resharding and preemption tests.)"""
    np = 2
    runs = run_stages(small_data, tmp_path, np, "mpirun")
    assert len(runs[0]) == 5 and len(set(runs[0])) == 5
    for stage in (1, 2):
        assert runs[stage] == pytest.approx(runs[0], rel=1e-5), stage
    slices = sorted((tmp_path / "stage2" / "checkpoints" / "step_00000005").glob("optimizer.rank*"))
    assert [p.name for p in slices] == [checkpoint.slice_name(r, np) for r in range(np)]
    states = [torch.load(p, weights_only=True) for p in slices]
    trainable = sum(t.numel() for t in torch.load(slices[0].parent / "model.pt").values())
    assert sum(s["exp_avg"].numel() for s in states) == trainable  # the ranks' slices partition the state
    assert all(s["exp_avg"].numel() <= -(-trainable // np) + np * 8 for s in states)  # ceil(P/N) + padding
    assert "train_state.pt" in json.loads((slices[0].parent / "manifest.json").read_text())["files"]
    assert "optimizer" not in checkpoint.load_train_state(slices[0].parent)  # no file holds the whole state


@pytest.mark.slow
def test_resume_at_another_world_size_reshards(small_data, tmp_path):
    """5 steps at np=2 (batch 3), then --resume auto at np=3 (batch 2): the losses of 10 straight steps at
    np=1 (batch 6). The data position and the optimizer slices both carry over."""
    common = {"train.max_steps": 10, "checkpoint.every": 5, "checkpoint.keep": 0, "dist.zero_stage": 2,
              "train.grad_accum": 1, "train.eval_every": 10}
    single = train_single(tmp_path / "one", values(small_data, **common, **{"train.batch_size": 6}), timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    two = tmp_path / "two"
    assert train_job(two, values(small_data, **common)).returncode == 0
    resharded = stopped_copy(two, tmp_path / "resharded", at_step=5)
    job = train_job(resharded, values(small_data, **common, **{"train.batch_size": 2}), "--resume", "auto", np=3)
    assert job.returncode == 0, job.output[-3000:]
    assert "saved on 2 rank(s) on 3" in job.output
    assert [r["step"] for r in metrics(resharded) if "loss" in r] == list(range(1, 11))
    assert losses(resharded) == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert losses(resharded)[:5] == losses(two)[:5]
    # The sharded checkpoint serves evaluate like any other: its figure is training's last validation.
    out = tmp_path / "eval.json"
    done = subprocess.run([sys.executable, "-m", "hvd_llama.evaluate", "--checkpoint", str(resharded), "--json", str(out)],
                          cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(out.read_text())["loss_per_token"] == pytest.approx(metrics(resharded)[-1]["val_loss"], rel=1e-6)
    # A corrupt slice makes the checkpoint bad: the previous one is used.
    last = resharded / "checkpoints" / "step_00000010"
    victim = last / checkpoint.slice_name(1, 3)
    damaged = bytearray(victim.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    victim.write_bytes(bytes(damaged))
    with pytest.warns(UserWarning, match="checksum of optimizer.rank00001-of-00003.pt"):
        assert checkpoint.find_latest_checkpoint(resharded) == resharded / "checkpoints" / "step_00000005"


@pytest.mark.slow
def test_bf16_master_weights_track_fp32(small_data, tmp_path):
    steps = {"train.max_steps": 20, "train.grad_accum": 1, "optim.grad_clip": 1.0}
    fp32 = train_job(tmp_path / "fp32", values(small_data, **steps))
    bf16 = train_job(tmp_path / "bf16", values(small_data, **steps, **{"train.precision": "bf16",
                                                                       "dist.zero_stage": 1}))
    assert fp32.returncode == 0 and bf16.returncode == 0, fp32.output[-2000:] + bf16.output[-2000:]
    assert losses(tmp_path / "bf16") == pytest.approx(losses(tmp_path / "fp32"), rel=0.02)
    assert losses(tmp_path / "bf16") != losses(tmp_path / "fp32")  # bf16 really ran
    saved = torch.load(tmp_path / "bf16" / "checkpoints" / "step_00000020" / "model.pt", weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in saved.values())  # as the model held them: nothing widened
    model, _, _ = load_model(tmp_path / "bf16")  # readable like any checkpoint
    assert torch.isfinite(model(torch.randint(0, 512, (1, 8)))).all()
    slices = checkpoint.read_optimizer_slices(tmp_path / "bf16" / "checkpoints" / "step_00000020")
    assert all("master" in s for s in slices)  # the fp32 master copy lives in the slices


def test_a_run_that_cannot_fit_is_refused_at_start_up(small_data, tmp_path):
    start = time.monotonic()
    done = train_single(tmp_path / "run", ["--config", "configs/llama2-70b.yaml", "--set", "model.vocab_size=512",
                                           "--set", f"data.dir={small_data}"])
    assert done.returncode == 2, done.stderr[-2000:]
    assert time.monotonic() - start < 30
    line = done.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("error: this run needs") and line[0].count("more ranks") == 2
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_refuses_a_checkpoint_of_the_other_kind(micro_run, small_data, tmp_path):
    run_dir = stopped_copy(micro_run, tmp_path / "run", at_step=3)
    done = train_single(run_dir, micro_overrides(small_data, **{"dist.zero_stage": 2}), "--resume", "auto")
    assert done.returncode == 2
    assert "written at dist.zero_stage=0; resume it with --set dist.zero_stage=0" in done.stderr


@pytest.mark.parametrize("extra, message", [
    (["dist.elastic=true"], "dist.elastic=true needs dist.zero_stage=0"),
    (["dist.zero_bucket_elements=-1"], "dist.zero_bucket_elements must be >= 0, got -1"),
])
def test_sharding_refuses_what_it_cannot_do(extra, message):
    from hvd_llama.cli import UserError
    from hvd_llama.config import load_config
    with pytest.raises(UserError, match=message):
        load_config(None, ["dist.zero_stage=2", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_preemption_and_a_failed_slice_write_when_sharded(small_data, tmp_path, stage):
    overrides = values(small_data, **{"train.max_steps": 100, "checkpoint.every": 0, "dist.zero_stage": stage})
    stopped, stop_step, resumed_losses = interrupted_then_resumed(overrides, tmp_path, 2, "horovodrun", signal.SIGTERM)
    assert stopped.returncode == 0 and "stop requested by a signal" in stopped.output, stopped.output[-3000:]
    assert len(list((tmp_path / "stopped" / "checkpoints" / f"step_{stop_step:08d}").glob("optimizer.rank*"))) == 2
    straight = tmp_path / "straight"
    assert train_job(straight, overrides, timeout=300).returncode == 0
    assert resumed_losses == losses(straight)  # bit for bit through the sharded checkpoint
    # Rank 1 cannot write its slice: the checkpoint fails on every rank and the previous one stays.
    run_dir = tmp_path / "diskfull"
    job = train_job(run_dir, values(small_data, **{"train.max_steps": 4, "checkpoint.every": 2, "checkpoint.keep": 0,
                                                   "dist.zero_stage": stage}), env={"HVD_LLAMA_FAULT": "diskfull:4:1"})
    assert job.returncode != 0
    assert job.output.count("error: writing checkpoint step_00000004 failed") == 2 and "rank 1" in job.output
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000002"]  # no staging folder left


@pytest.mark.slow
def test_lora_shards_only_the_adapters(micro_run, small_data, tmp_path):
    lora = {"finetune.lora_rank": 4, "finetune.lora_alpha": 8, "finetune.lora_targets": "wq,wv,w2"}
    for stage in (0, 2):
        job = train_job(tmp_path / f"s{stage}", values(small_data, **lora, **{"dist.zero_stage": stage}),
                        "--init-from", str(micro_run))
        assert job.returncode == 0, job.output[-3000:]
    assert losses(tmp_path / "s2") == pytest.approx(losses(tmp_path / "s0"), rel=1e-5)
    slices = checkpoint.read_optimizer_slices(tmp_path / "s2" / "checkpoints" / "step_00000005")
    names = [name for name, _ in slices[0]["params"]]
    assert names and all("lora_" in name for name in names)  # the frozen base has no optimizer state
