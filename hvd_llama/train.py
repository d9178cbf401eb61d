"""The training application: `horovodrun -np N python -m hvd_llama.train --config configs/tiny.yaml`.

N ranks train exactly the model one rank would train with an N-times larger batch: each rank reads its own share
of every step's items of one global sample order (data.py), the data-parallel optimizer averages the gradients
(hvd.DistributedOptimizer, or ZeRO stages 1-2: parallel/zero.py), and every rank applies the same update. Only rank 0
writes the run's files (metrics.py; checkpointing.py, where every rank writes its own optimizer slice).
"""
from __future__ import annotations

import argparse
import math
import os
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

from hvd_llama import parallel
from hvd_llama.cli import UserError, run_main
from hvd_llama.config import Config, load_config
from hvd_llama.device import allow_tf32, device_peak_flops, format_flops, resolve_device
from hvd_llama.files import atomic_write_text
from hvd_llama.parallel import elastic
from hvd_llama.procs import StopFlag, rank_name, say, show
from hvd_llama.training.builder import build_training, check_data, device_memory, load_pretrained, lora_summary
from hvd_llama.training.checkpointing import Checkpointer, Progress
from hvd_llama.training.compute import AUTOCAST_DTYPES, score, spread_selection, train_step
from hvd_llama.training.data import SampleOrder, StepBatches, open_split
from hvd_llama.training.faults import Fault
from hvd_llama.training.memory import check_fits
from hvd_llama.training.metrics import MetricsLogger, format_duration
from hvd_llama.training.optim import lr_at, set_lr
from hvd_llama.training.preemption import MIN_GRACE_S, StopTime
from hvd_llama.weights import checkpoint


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hvd_llama.train", description=__doc__.split("\n\n")[0],
        epilog="Example: horovodrun -np 2 -H localhost:2 python -m hvd_llama.train --config configs/tiny.yaml "
               "--set train.max_steps=100 --run-dir runs/demo")
    parser.add_argument("--config", help="YAML config (see configs/); defaults apply to anything it leaves out")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--run-dir", help="where config, metrics, TensorBoard and checkpoints go "
                                          "(default: runs/<config name>)")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue from a checkpoint: 'auto' = newest good one in the run dir (a fresh start "
                             "if there is none), or a checkpoint folder")
    parser.add_argument("--init-from", metavar="PATH",
                        help="start from pretrained weights (hvd_llama checkpoint, Hugging Face or Meta folder); "
                             "optimizer, step and schedule start fresh (same as finetune.init_from)")
    parser.add_argument("--elastic", action="store_true", help="run under Horovod Elastic (same as dist.elastic=true)")
    return parser.parse_args(argv)


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, device: torch.device, init_state: Optional[dict] = None,
                 fault: Fault = Fault()):
        """`init_state`: pretrained weights (rank 0 only; the others receive them in resume())."""
        self.cfg, self.run_dir, self.device, self.fault = cfg, run_dir, device, fault
        t = cfg.train
        built = build_training(cfg, device, init_state, initialise=parallel.is_main())
        self.model, self.optimizer, self.scaler = built.model, built.optimizer, built.scaler
        self.checkpointer = Checkpointer(cfg, run_dir, self.model, self.optimizer, self.scaler, parallel, fault)
        self.train_data = open_split(cfg.data.dir, "train", t.seq_len)
        self.val_data = open_split(cfg.data.dir, "val", t.seq_len, scoring=True) \
            if t.eval_every or t.eval_at_start else None
        self.order = SampleOrder(len(self.train_data), seed=t.seed)
        self.progress = Progress(world_size=parallel.size())
        self.lr_scale = 1.0  # elastic: world size / the size the job started with (linear scaling rule)
        self.stop_flag = StopFlag(cfg.train.stop_grace_s or MIN_GRACE_S)  # sized in run() when 0

    def resume(self, resume: Optional[str]) -> None:
        """Every rank starts from rank 0's weights, or from the checkpoint `resume` names (checkpointing.py)."""
        restored = self.checkpointer.resume(resume, lambda has_optimizer_state: parallel.broadcast_state(
            self.model, self.optimizer, has_optimizer_state))
        self.progress = restored or self.progress

    def save(self) -> Path:
        return self.checkpointer.save(self.progress)

    # ---- the loop ----------------------------------------------------------------------------------------
    def peak_flops(self) -> tuple[float, str]:
        """The job's peak and its source: per-rank peaks measured at the same moment and summed (ranks may
        share a CPU), or a known GPU's datasheet figure."""
        if self.cfg.log.peak_flops > 0:
            return self.cfg.log.peak_flops * parallel.size(), "log.peak_flops"
        dtype = AUTOCAST_DTYPES.get(self.cfg.train.precision, torch.float32)
        parallel.allreduce_sum(torch.zeros(1), name="peak.barrier")
        own, source = device_peak_flops(self.device, dtype)
        return parallel.allreduce_sum(torch.tensor([own]), name="peak.sum").item(), source

    def run_elastic(self, logger: MetricsLogger) -> dict:
        """Horovod Elastic: train inside hvd.elastic.run; a lost or added worker rolls back to the last commit."""
        state = elastic.training_state(self.model, self.optimizer, progress=asdict(self.progress),
                                   initial_size=parallel.size())

        def on_reset():
            logger.set_enabled(parallel.is_main(), state.progress["step"])  # rank 0 may be another process now
            self.lr_scale = parallel.size() / state.initial_size
            logger.message(f"elastic reset: {parallel.size()} ranks now, global batch "
                           f"{self.cfg.train.batch_size * self.cfg.train.grad_accum * parallel.size()} sequences, "
                           f"learning rate x{self.lr_scale:.3g}; continuing from step {state.progress['step']}")

        def commit():
            state.progress = asdict(self.progress)  # a fresh dict: ObjectState keeps what it is given
            state.commit()

        state.register_reset_callbacks([on_reset])

        @elastic.run
        def train(state):
            self.progress = replace(Progress(**state.progress), world_size=parallel.size())
            self.lr_scale = parallel.size() / state.initial_size
            logger.truncate_after(self.progress.step)  # steps after the last commit are trained again
            return self.run(logger, commit)

        return train(state)

    def run(self, logger: MetricsLogger, commit=None) -> dict:
        t, p = self.cfg.train, self.progress
        stream = StepBatches(self.train_data, self.order, parallel.rank(), parallel.size())
        self.tokens_per_step = t.batch_size * t.grad_accum * t.seq_len * parallel.size()
        self.flops_per_token, (self.peak, peak_source) = self.model.flops_per_token(t.seq_len), self.peak_flops()
        if self.device.type == "cuda":  # max_memory_gib: training's peak, not set-up's (resume, the peak's matmuls)
            torch.cuda.reset_peak_memory_stats(self.device)
        logger.message(f"MFU peak: {format_flops(self.peak)} over {parallel.size()} rank(s) ({peak_source})")
        stop = StopTime.begin(self.stop_flag, t.stop_grace_s, self.model, logger.last_save, parallel,
                              self.fault.save_delay_s)
        session_start, first_step, record, bad_in_a_row = time.perf_counter(), p.step, {}, 0
        if t.eval_at_start and p.step == 0 and self.val_data is not None:
            logger.log_eval(0, self.validation(whole=False))
        while p.step < t.max_steps:
            step_start = time.perf_counter()
            lr = lr_at(p.step, self.cfg.optim, t.max_steps) * self.lr_scale
            set_lr(self.optimizer, lr)
            batches = stream.step(p.samples, t.batch_size, t.grad_accum)
            poison = self.fault.at("nan", p.step + 1, parallel.rank())
            result = train_step(self.model, self.optimizer, batches, self.device, t.precision,
                                self.cfg.optim.grad_clip, self.scaler, poison=poison, ranks=parallel,
                                loss_chunk=t.loss_chunk)
            # Horovod: one small allreduce per step carries the loss and the preemption vote together.
            loss_sum, stop_votes = parallel.allreduce_sum(
                torch.tensor([result.loss_sum, float(self.stop_flag.requested)]), name="step.stats").tolist()
            p.step += 1
            p.samples += t.batch_size * t.grad_accum * parallel.size()
            p.tokens += self.tokens_per_step
            p.elapsed_s += time.perf_counter() - step_start
            record = self.step_record(loss_sum / max(result.n_targets, 1), lr, result, step_start)
            record["eta_s"] = (t.max_steps - p.step) * (time.perf_counter() - session_start) / (p.step - first_step)
            logger.log_step(record, t.max_steps)
            stop.stepped(time.perf_counter() - step_start)
            # An fp16 overflow (gradients not finite, every rank's loss finite: the allreduced sum says so) is the
            # loss scaler's business, normal early in training; only other skipped steps are bad ones.
            overflow = self.scaler is not None and math.isfinite(loss_sum)
            bad_in_a_row = 0 if result.stepped or overflow else bad_in_a_row + 1
            if bad_in_a_row > t.max_bad_steps:  # the same on every rank: decided by allreduced numbers
                raise UserError(f"{bad_in_a_row} non-finite steps in a row at step {p.step} (limit "
                                f"train.max_bad_steps={t.max_bad_steps}); lower optim.lr or resume from "
                                "an earlier checkpoint with --resume PATH")
            if self.fault.at("raise", p.step, parallel.rank()):
                raise RuntimeError(f"injected fault at step {p.step} (HVD_LLAMA_FAULT)")
            if self.fault.at("exit", p.step, parallel.rank()):
                os._exit(1)  # a worker that vanishes (killed, lost host)
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

    def step_record(self, loss: float, lr: float, result, step_start: float) -> dict:
        """One line of metrics.jsonl (validation figures added on evaluation steps)."""
        t, p = self.cfg.train, self.progress
        tokens_per_s = self.tokens_per_step / (time.perf_counter() - step_start)
        record = {"step": p.step, "loss": loss, "lr": lr, "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s,
                  "mfu": self.flops_per_token * tokens_per_s / self.peak, "tokens": p.tokens,
                  "elapsed_s": p.elapsed_s, "skipped": not result.stepped, "world_size": parallel.size()}
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


def replicas_identical(model: torch.nn.Module) -> bool:
    """Compare a fingerprint of every rank's weights (float64 sum and sum of squares per tensor)."""
    with torch.no_grad():
        fingerprint = [(p.double().sum().item(), p.double().square().sum().item()) for p in model.parameters()]
    return len({repr(f) for f in parallel.allgather_object(fingerprint, name="replicas")}) == 1


def default_run_dir(config_path: Optional[str]) -> Path:
    return Path("runs") / (Path(config_path).stem if config_path else "default")


def prepare_run_dir(run_dir: Path, resume: Optional[str], cfg: Config) -> None:
    """Rank 0: refuse to mix a fresh run into an old one, or to share the run dir with a live job (rank 0 holds
    the run dir's lock for the job's life); remove what killed saves left; record the resolved config."""
    if not resume and checkpoint.list_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints: pass --resume auto to continue it, "
                        "or choose another --run-dir")
    lock = checkpoint.RunDirLock(run_dir)
    removed = lock.remove_stale_saves(run_dir)
    if removed:
        show(removed)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def summary_line(record: dict, before: Progress, after: Progress, seconds: float, run_dir: Path,
                 replicas_identical: bool) -> str:
    """The last line a person reads: where the run ended, how good, how fast (this session's average)."""
    val = f" | val loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f}, {record['val_tokens']:,} tokens)" \
        if "val_loss" in record else ""
    replicas = "replicas identical" if replicas_identical else "WARNING: replicas differ"
    tokens_per_s = (after.tokens - before.tokens) / max(after.elapsed_s - before.elapsed_s, 1e-9)
    return (f"done: {after.step} steps ({after.step - before.step} this session) in {format_duration(seconds)}"
            f" | train loss {record.get('loss', float('nan')):.4f}{val} | {replicas}"
            f" | {tokens_per_s:,.0f} tok/s | run dir {run_dir}")


def _main(argv: Optional[Sequence[str]]) -> None:
    args = parse_args(argv)
    overrides = args.set + (["dist.elastic=true"] if args.elastic else []) + \
        ([f"finetune.init_from={args.init_from}"] if args.init_from else [])
    cfg = load_config(args.config, overrides)
    device_kind = resolve_device(cfg.train.device, "train.device").type
    fault = Fault.from_env()
    meta = check_data(cfg)  # every rank fails alike, before any collective, on bad config or data
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
    if args.resume and args.resume != "auto" and not Path(args.resume).exists():
        raise UserError(f"--resume {args.resume}: no such checkpoint (use 'auto' or a checkpoint folder)")
    device = parallel.init(cfg.dist, device_kind)
    allow_tf32(device, cfg.train.tf32)
    # Elastic: a worker added to a running job makes none of the start-up collectives; the state's sync
    # brings it up to date.
    joining = cfg.dist.elastic and elastic.joining()
    if not joining:
        parallel.run_on_main(lambda: prepare_run_dir(run_dir, args.resume, cfg), name="run_dir")
    init_state = load_pretrained(cfg, meta, joining) if cfg.finetune.init_from else None
    check_fits(cfg, parallel.size(), device_memory(device), device.type)  # before allocating: every rank alike
    trainer = Trainer(cfg, run_dir, device, init_state, fault)
    if not joining:
        trainer.resume(args.resume)
    before, start = replace(trainer.progress), time.perf_counter()
    logger = MetricsLogger(run_dir, parallel.is_main(), cfg.log.tensorboard, cfg.log.every,
                           resume_step=before.step if args.resume else None)
    if cfg.finetune.lora_rank:
        logger.message(lora_summary(trainer.model, cfg))
    logger.message(f"training {trainer.model.num_params():,} parameters on {parallel.size()} rank(s), "
                   f"{device.type}, {cfg.train.precision}; {meta['splits']['train']['tokens']:,} train tokens; "
                   f"run dir {run_dir}; {parallel.describe()}")
    try:
        record = trainer.run_elastic(logger) if cfg.dist.elastic else trainer.run(logger)
    finally:
        logger.close()
    identical = replicas_identical(trainer.model)
    logger.message(summary_line(record, before, trainer.progress, time.perf_counter() - start, run_dir, identical))
    if cfg.dist.elastic:
        elastic.leave_job()


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        run_main(_main, argv)
    except Exception as err:  # a crash: name the rank, so the job's log says which one died first
        say(traceback.format_exc().rstrip())
        say(f"error: rank {rank_name()} failed: {type(err).__name__}: {err}")
        os._exit(1)  # do not wait for Horovod's background thread: the other ranks must see us gone


if __name__ == "__main__":
    main()
