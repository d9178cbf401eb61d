"""The training loop and its records: one optimizer step at a time over the job's global sample order, every rank
alike; the metrics line of each step, validation, checkpoints at their steps and at a stop request; Horovod
Elastic's commits and resets."""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch

from hvd_llama import parallel
from hvd_llama.cli import UserError
from hvd_llama.config import Config
from hvd_llama.device import device_peak_flops, format_flops
from hvd_llama.parallel import elastic
from hvd_llama.procs import StopFlag
from hvd_llama.training.builder import build_training
from hvd_llama.training.checkpointing import Checkpointer, Progress
from hvd_llama.training.compute import AUTOCAST_DTYPES, StepResult, score, spread_selection, train_step
from hvd_llama.training.data import SampleOrder, StepBatches, open_split
from hvd_llama.training.faults import Fault
from hvd_llama.training.metrics import MetricsLogger
from hvd_llama.training.optim import lr_at, set_lr
from hvd_llama.training.preemption import MIN_GRACE_S, StopTime


class Trainer:
    """One run's model, optimizer and data on this rank, and the loop (`run`) that trains them."""

    def __init__(self, cfg: Config, run_dir: Path, device: torch.device, init_state: Optional[dict] = None,
                 fault: Fault = Fault()):
        """`init_state`: pretrained weights (rank 0 only; the others receive them in resume())."""
        self.cfg, self.run_dir, self.device, self.fault = cfg, run_dir, device, fault
        t = cfg.train
        built = build_training(cfg, device, init_state, initialise=parallel.is_main())
        self.model, self.optimizer, self.scaler = built.model, built.optimizer, built.scaler
        self.checkpointer = Checkpointer(cfg, run_dir, self.model, self.optimizer, self.scaler, parallel, fault)
        self.train_data = open_split(cfg.data.dir, "train", t.seq_len, verify=cfg.data.verify)
        self.val_data = open_split(cfg.data.dir, "val", t.seq_len, verify=cfg.data.verify, scoring=True) \
            if t.eval_every or t.eval_at_start else None
        self.order = SampleOrder(len(self.train_data), seed=t.seed)
        self.progress = Progress(world_size=parallel.size())
        self.lr_scale = 1.0  # elastic: world size / the size the job started with (linear scaling rule)
        self.stop_flag = StopFlag(cfg.train.stop_grace_s or MIN_GRACE_S)  # sized in run() when 0

    def resume(self, resume: Optional[str]) -> None:
        """Every rank starts from rank 0's weights, or from the checkpoint `resume` names (checkpointing.py)."""
        restored = self.checkpointer.resume(resume)
        self.progress = restored or self.progress

    def save(self) -> Path:
        return self.checkpointer.save(self.progress)

    def run(self, logger: MetricsLogger, commit=None) -> dict:
        """Train to train.max_steps (or a stop request); return the last step's record. `commit`: elastic's."""
        t, p = self.cfg.train, self.progress
        stream = StepBatches(self.train_data, self.order, parallel.rank(), parallel.size())
        stop = self.begin(logger)
        self.session_start, self.first_step, self.bad_in_a_row, record = time.perf_counter(), p.step, 0, {}
        if t.eval_at_start and p.step == 0 and self.val_data is not None:
            logger.log_eval(0, self.validation(whole=False))
        while p.step < t.max_steps:
            record, stop_votes = self.step(stream, logger, stop)
            if commit and p.step % self.cfg.dist.commit_every == 0:
                commit()
            every = self.cfg.checkpoint.every
            if stop_votes > 0 or p.step == t.max_steps or (every and p.step % every == 0):
                path = stop.save(self.save, logger)  # timed, logged; resizes the stop grace
                if stop_votes > 0:
                    logger.message(f"stop requested by {self.stop_flag.reason or 'another rank'}: saved {path} "
                                   f"at step {p.step}; resubmit with --resume auto to continue")
                    break
        return record

    def begin(self, logger: MetricsLogger) -> StopTime:
        """A session's figures (tokens per step, FLOPs per token, the job's peak) and its stop time."""
        t = self.cfg.train
        self.tokens_per_step = t.batch_size * t.grad_accum * t.seq_len * parallel.size()
        self.flops_per_token = self.model.flops_per_token(t.seq_len)
        self.peak, peak_source = job_peak_flops(self.cfg, self.device)
        if self.device.type == "cuda":  # max_memory_gib: training's peak, not set-up's (resume, the peak's matmuls)
            torch.cuda.reset_peak_memory_stats(self.device)
        logger.message(f"MFU peak: {format_flops(self.peak)} over {parallel.size()} rank(s) ({peak_source})")
        return StopTime.begin(self.stop_flag, t.stop_grace_s, self.model, logger.last_save, parallel,
                              self.fault.save_delay_s)

    def step(self, stream: StepBatches, logger: MetricsLogger, stop: StopTime) -> tuple[dict, float]:
        """One optimizer step on every rank; its record, and the ranks' votes to stop."""
        t, p = self.cfg.train, self.progress
        step_start = time.perf_counter()
        lr = lr_at(p.step, self.cfg.optim, t.max_steps) * self.lr_scale
        set_lr(self.optimizer, lr)
        batches = stream.step(p.samples, t.batch_size, t.grad_accum)
        result = train_step(self.model, self.optimizer, batches, self.device, t.precision, self.cfg.optim.grad_clip,
                            self.scaler, poison=self.fault.at("nan", p.step + 1, parallel.rank()), ranks=parallel,
                            loss_chunk=t.loss_chunk)
        # Horovod: one small allreduce per step carries the loss and the preemption vote together.
        loss_sum, stop_votes = parallel.allreduce_sum(
            torch.tensor([result.loss_sum, float(self.stop_flag.requested)]), name="step.stats").tolist()
        p.step += 1
        p.samples += t.batch_size * t.grad_accum * parallel.size()
        p.tokens += self.tokens_per_step
        p.elapsed_s += time.perf_counter() - step_start
        record = self.step_record(loss_sum / max(result.n_targets, 1), lr, result, step_start)
        logger.log_step(record, t.max_steps)
        stop.stepped(time.perf_counter() - step_start)
        self.check_step(result, loss_sum)
        return record, stop_votes

    def check_step(self, result: StepResult, loss_sum: float) -> None:
        """Stop after too many non-finite steps in a row; inject this step's faults."""
        t, p = self.cfg.train, self.progress
        # An fp16 overflow (gradients not finite, every rank's loss finite: the allreduced sum says so) is the
        # loss scaler's business, normal early in training; only other skipped steps are bad ones.
        overflow = self.scaler is not None and math.isfinite(loss_sum)
        self.bad_in_a_row = 0 if result.stepped or overflow else self.bad_in_a_row + 1
        if self.bad_in_a_row > t.max_bad_steps:  # the same on every rank: decided by allreduced numbers
            raise UserError(f"{self.bad_in_a_row} non-finite steps in a row at step {p.step} (limit "
                            f"train.max_bad_steps={t.max_bad_steps}); lower optim.lr or resume from "
                            "an earlier checkpoint with --resume PATH")
        if self.fault.at("raise", p.step, parallel.rank()):
            raise RuntimeError(f"injected fault at step {p.step} (HVD_LLAMA_FAULT)")
        if self.fault.at("exit", p.step, parallel.rank()):
            os._exit(1)  # a worker that vanishes (killed, lost host)

    def step_record(self, loss: float, lr: float, result: StepResult, step_start: float) -> dict:
        """One line of metrics.jsonl (validation figures added on evaluation steps)."""
        t, p = self.cfg.train, self.progress
        now = time.perf_counter()
        tokens_per_s = self.tokens_per_step / (now - step_start)
        record = {"step": p.step, "loss": loss, "lr": lr, "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s,
                  "mfu": self.flops_per_token * tokens_per_s / self.peak, "tokens": p.tokens,
                  "elapsed_s": p.elapsed_s, "skipped": not result.stepped, "world_size": parallel.size(),
                  "eta_s": (t.max_steps - p.step) * (now - self.session_start) / (p.step - self.first_step)}
        if self.scaler:
            record["loss_scale"] = self.scaler.scale
        if self.device.type == "cuda":  # this rank's peak since set-up (what the memory planner predicts)
            record["max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if t.eval_every and (p.step % t.eval_every == 0 or p.step == t.max_steps):
            record.update(self.validation(whole=p.step == t.max_steps))
        return record

    def validation(self, whole: bool) -> dict:
        """val_loss per target token over `train.eval_windows` items spread over the val split, or over the
        whole split (`whole`, at the last step: the figure `evaluate` reports for the final checkpoint)."""
        t = self.cfg.train
        indices = spread_selection(len(self.val_data), 0 if whole else t.eval_windows, seed=t.seed)
        sums = score(self.model, self.val_data, indices, t.batch_size, self.device, t.precision,
                     loss_chunk=t.loss_chunk)
        loss = sums["loss_sum"] / sums["tokens"]
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_windows": sums["items"],
                "val_tokens": sums["tokens"]}


def job_peak_flops(cfg: Config, device: torch.device) -> tuple[float, str]:
    """The job's peak (the MFU denominator) and its source: per-rank peaks measured at the same moment and summed
    (ranks may share a CPU), or a known GPU's datasheet figure, or log.peak_flops."""
    if cfg.log.peak_flops > 0:
        return cfg.log.peak_flops * parallel.size(), "log.peak_flops"
    dtype = AUTOCAST_DTYPES.get(cfg.train.precision, torch.float32)
    parallel.allreduce_sum(torch.zeros(1), name="peak.barrier")
    own, source = device_peak_flops(device, dtype)
    return parallel.allreduce_sum(torch.tensor([own]), name="peak.sum").item(), source


def run_elastic(trainer: Trainer, logger: MetricsLogger) -> dict:
    """Horovod Elastic: train inside hvd.elastic.run; a lost or added worker rolls back to the last commit."""
    state = elastic.training_state(trainer.model, trainer.optimizer, progress=asdict(trainer.progress),
                                   initial_size=parallel.size())
    batch = trainer.cfg.train.batch_size * trainer.cfg.train.grad_accum

    def on_reset():
        logger.set_enabled(parallel.is_main(), state.progress["step"])  # rank 0 may be another process now
        trainer.lr_scale = parallel.size() / state.initial_size
        logger.message(f"elastic reset: {parallel.size()} ranks now, global batch {batch * parallel.size()} "
                       f"sequences, learning rate x{trainer.lr_scale:.3g}; continuing from step "
                       f"{state.progress['step']}")

    def commit():
        state.progress = asdict(trainer.progress)  # a fresh dict: ObjectState keeps what it is given
        state.commit()

    state.register_reset_callbacks([on_reset])

    @elastic.run
    def train(state):
        trainer.progress = replace(Progress(**state.progress), world_size=parallel.size())
        trainer.lr_scale = parallel.size() / state.initial_size
        logger.truncate_after(trainer.progress.step)  # steps after the last commit are trained again
        return trainer.run(logger, commit)

    return train(state)


def replicas_identical(model: torch.nn.Module, stage: int) -> Optional[bool]:
    """Compare a fingerprint of every rank's weights (float64 sum and sum of squares per tensor); None at ZeRO
    stage 3, where every rank holds other weights (its slices)."""
    if stage == 3:
        return None
    with torch.no_grad():
        fingerprint = [(p.double().sum().item(), p.double().square().sum().item()) for p in model.parameters()]
    return len({repr(f) for f in parallel.allgather_object(fingerprint, name="replicas")}) == 1
