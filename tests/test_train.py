"""The training application in one process: exactness against plain PyTorch, resume, outputs, bad input."""
import pytest
import torch
import torch.nn.functional as F
from support.multiproc import run_snippet
from support.trainrun import losses, metrics, micro_overrides, stopped_copy, train_single
from torch.utils.data import DistributedSampler

from hvd_llama.config import load_config
from hvd_llama.model import Transformer
from hvd_llama.training.data import TokenWindows
from hvd_llama.training.optim import lr_at


def plain_pytorch_losses(overrides: list) -> list:
    """The reference: the same model, data order, AdamW, schedule and clipping with no Horovod at all."""
    cfg = load_config(None, [v for v in overrides if v != "--set"])
    t, o = cfg.train, cfg.optim
    torch.manual_seed(t.seed)
    model = Transformer(cfg.model)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    data = TokenWindows(cfg.data.dir, "train", t.seq_len)
    order = list(DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=t.seed))  # epoch 0
    result = []
    for step in range(t.max_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, o, t.max_steps)
        batch = torch.stack([data[i] for i in order[step * t.batch_size:(step + 1) * t.batch_size]])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        opt.zero_grad()
        result.append(loss.item())
    return result


def test_one_rank_equals_plain_pytorch_loop(data_dir, tmp_path):
    # Clipping at 0.5 is active from the first steps, so a wrong clip shows too.
    overrides = micro_overrides(data_dir, **{"train.max_steps": 6, "optim.grad_clip": 0.5})
    run = train_single(tmp_path / "run", overrides)
    assert run.returncode == 0, run.stderr[-3000:]
    ours, reference = losses(tmp_path / "run"), plain_pytorch_losses(overrides)
    assert len(ours) == 6
    assert ours == pytest.approx(reference, rel=1e-6)
    assert ours[-1] < ours[0]


def test_grad_accum_equals_doubled_batch(data_dir, tmp_path):
    accum = train_single(tmp_path / "a", micro_overrides(data_dir, **{"train.grad_accum": 2}))
    double = train_single(tmp_path / "b", micro_overrides(data_dir, **{"train.batch_size": 8}))
    assert accum.returncode == 0 and double.returncode == 0, accum.stderr[-2000:] + double.stderr[-2000:]
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)


def test_resume_continues_bit_for_bit(data_dir, tmp_path):
    overrides = micro_overrides(data_dir, **{"train.max_steps": 8, "checkpoint.every": 4, "checkpoint.keep": 0})
    straight = tmp_path / "straight"
    assert train_single(straight, overrides).returncode == 0
    stopped = stopped_copy(straight, tmp_path / "stopped", at_step=4)
    resumed = train_single(stopped, overrides, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step_00000004" in resumed.stdout
    assert [r["step"] for r in metrics(stopped)] == list(range(1, 9))
    assert losses(stopped) == losses(straight)  # exact, not approximate
    a = torch.load(straight / "checkpoints/step_00000008/model.pt")
    b = torch.load(stopped / "checkpoints/step_00000008/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_outputs_metrics_tensorboard_and_summary(data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = tmp_path / "run"
    run = train_single(run_dir, micro_overrides(data_dir, **{"train.max_steps": 4, "train.eval_every": 2}))
    assert run.returncode == 0, run.stderr[-3000:]
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed_s"):
        assert all(r[key] > 0 for r in records), key
    assert [("val_loss" in r) for r in records] == [False, True, False, True]
    assert records[-1]["tokens"] == 4 * 4 * 32  # steps x batch x seq_len
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "step_00000004").is_dir()
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/mfu", "val/loss",
            "val/ppl"} <= tags
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in records])
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("done: 4 steps") and "val loss" in last and "tok/s" in last


@pytest.mark.parametrize("extra, message", [
    ({"model.vocab_size": 1000}, "model.vocab_size=1000 but the tokenizer"),
    ({"model.dim": 66}, "dim"),
    ({"train.seq_len": 128}, "train.seq_len=128 exceeds model.max_seq_len=64"),
    ({"data.dir": "/nonexistent/data"}, "/nonexistent/data"),
    ({"train.bogus": 1}, "unknown config key train.bogus"),
])
def test_bad_config_fails_fast_with_one_line(data_dir, tmp_path, extra, message):
    run = train_single(tmp_path / "run", micro_overrides(data_dir, **extra), timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: ") and message in run.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fresh_start_refuses_a_run_with_checkpoints(data_dir, tmp_path):
    overrides = micro_overrides(data_dir, **{"train.max_steps": 2})
    assert train_single(tmp_path / "run", overrides).returncode == 0
    again = train_single(tmp_path / "run", overrides)
    assert again.returncode == 2 and "--resume auto" in again.stderr


# Trainer.run on its CUDA path in one process, the steps faked (no GPU here): when the peak statistic is reset.
PEAK = """import sys, torch
from pathlib import Path
from types import SimpleNamespace
from hvd_llama import parallel
from hvd_llama.config import load_config
from hvd_llama.training import trainer as loop
from hvd_llama.training.metrics import MetricsLogger
run_dir, events = Path(sys.argv[1]), []
cfg = load_config(None, sys.argv[3::2])  # the values of --set k=v
parallel.init(cfg.dist, "cpu")
trainer = loop.Trainer(cfg, run_dir, torch.device("cpu"))
trainer.device = torch.device("cuda", 0)  # run()'s CUDA path; nothing below touches the device
loop.job_peak_flops = lambda cfg, device: events.append("peak measured") or (1e12, "stub")
torch.cuda.reset_peak_memory_stats = lambda device: events.append(f"peak statistic reset on {device}")
torch.cuda.max_memory_allocated = lambda device: 3 * 2**29
def step(*args, **kwargs):
    events.append("step")
    return SimpleNamespace(loss_sum=1.0, n_targets=1, grad_norm=0.5, stepped=True)
loop.train_step = step
run_dir.mkdir(parents=True)
trainer.run(MetricsLogger(run_dir, True, False, 1))
print("events:", events)
"""


@pytest.mark.slow
def test_the_logged_peak_memory_starts_after_set_up(small_data, tmp_path):
    """Set-up (rank 0's pretrained weights, a resume, the matmuls of the peak measurement) can reach a higher
    peak than training's own steps: max_memory_gib is what the memory planner predicts only without them."""
    job = run_snippet(PEAK, tmp_path, [str(tmp_path / "run"), *micro_overrides(small_data, **{"train.max_steps": 2})],
                      np=0)
    assert job.returncode == 0, job.output[-3000:]
    assert "events: ['peak measured', 'peak statistic reset on cuda:0', 'step', 'step']" in job.output
    assert [r["max_memory_gib"] for r in metrics(tmp_path / "run")] == [1.5, 1.5]
