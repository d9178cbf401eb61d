"""The training application: `horovodrun -np N python -m hvd_llama.train --config configs/tiny.yaml`.

N ranks train exactly the model one rank would train with an N-times larger batch: each rank reads its own
windows (DistributedSampler), hvd.DistributedOptimizer averages the gradients, and every rank applies the same
update. Only rank 0 writes files (metrics.py, checkpoint.py).
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import random
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import yaml

from hvd_llama import checkpoint, dist
from hvd_llama.cli import UserError, atomic_write_text, run_main
from hvd_llama.compute import AUTOCAST_DTYPES, score, spread_selection, train_step
from hvd_llama.config import Config, load_config
from hvd_llama.data import SampleOrder, StepBatches, open_split
from hvd_llama.device import allow_tf32, resolve_device
from hvd_llama.memory import check_fits
from hvd_llama.startup import build_model, check_data, device_memory, load_pretrained, lora_summary
from hvd_llama.lora import load_lora_state_dict, lora_state_dict
from hvd_llama.metrics import MetricsLogger, device_peak_flops, format_duration, format_flops
from hvd_llama.pretrained import ADAPTER_FILE
from hvd_llama.optim import LossScaler, adamw_kwargs, lr_at, param_groups, set_lr
from hvd_llama.preemption import MIN_GRACE_S, StopTime, save_delay_s
from hvd_llama.procs import StopFlag, rank_name, say, show


@dataclass
class Progress:
    """Where training stands; saved in checkpoints so a resumed run continues exactly."""
    step: int = 0  # optimizer steps completed
    samples: int = 0  # items of the job's SampleOrder read, all ranks together (the data position)
    tokens: int = 0  # tokens trained on, all ranks together
    elapsed_s: float = 0.0  # training wall time, summed over resumed sessions
    world_size: int = 1  # ranks of the session that saved it

    @classmethod
    def restore(cls, saved: dict, world_size: int, n_items: int) -> "Progress":
        """A saved position. Checkpoints from before the global order kept an epoch and each rank's offset in
        it: they continue at the same epoch and number of items read in it (not the same items: the old order
        interleaved the ranks differently)."""
        if "samples" not in saved:
            saved = {"step": saved["step"], "tokens": saved["tokens"], "elapsed_s": saved["elapsed_s"],
                     "samples": saved["epoch"] * n_items + saved["offset"] * world_size, "world_size": world_size}
        return cls(**saved)


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


def rng_state() -> dict:
    """This process's RNG states. CUDA: its own device's only (each rank pins one GPU, and the process that
    resumes may see fewer devices); none when the process does not use CUDA."""
    cuda = torch.cuda.get_rng_state(torch.cuda.current_device()) if torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": cuda}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


@dataclass(frozen=True)
class Fault:
    """Fault injection for tests and drills: HVD_LLAMA_FAULT=KIND:STEP:RANK and HVD_LLAMA_SAVE_DELAY_S=SECONDS,
    read once at start-up."""
    kind: str = ""  # nan | raise | exit | diskfull; "" injects nothing
    step: int = 0
    rank: int = 0
    save_delay_s: float = 0.0  # every checkpoint save waits this long before writing (preemption.StopTime)

    KINDS = ("nan", "raise", "exit", "diskfull")

    @classmethod
    def from_env(cls) -> "Fault":
        spec, delay = os.environ.get("HVD_LLAMA_FAULT", ""), save_delay_s(os.environ)
        if not spec:
            return cls(save_delay_s=delay)
        kind, _, rest = spec.partition(":")
        step, _, rank = rest.partition(":")
        if kind not in cls.KINDS or not step.isdigit() or not rank.isdigit():
            raise UserError(f"HVD_LLAMA_FAULT={spec}: expected KIND:STEP:RANK with KIND one of "
                            f"{', '.join(cls.KINDS)} and STEP, RANK whole numbers")
        return cls(kind, int(step), int(rank), delay)

    def at(self, kind: str, step: int) -> bool:
        """Whether this rank injects `kind` at `step` (the rank is read now: elastic runs renumber ranks)."""
        return self.kind == kind and self.step == step and self.rank == dist.rank()


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, device: torch.device, init_state: Optional[dict] = None,
                 fault: Fault = Fault()):
        """`init_state`: pretrained weights (rank 0 only; the others receive them in resume())."""
        self.cfg, self.run_dir, self.device, self.fault = cfg, run_dir, device, fault
        t = cfg.train
        self.model = build_model(cfg, device, init_state)
        if t.activation_checkpointing:
            self.model.set_activation_checkpointing(True)
        if t.compile:
            self.model.compile_blocks()
        self.optimizer = dist.build_data_parallel_optimizer(
            self.model, param_groups(self.model, cfg.optim.weight_decay), adamw_kwargs(cfg.optim), cfg.dist,
            stage=cfg.dist.zero_stage, grad_accum=t.grad_accum, fused=device.type == "cuda",
            bucket_elements=cfg.dist.zero_bucket_elements)
        self.scaler = LossScaler() if t.precision == "fp16" else None
        self.train_data = open_split(cfg.data.dir, "train", t.seq_len)
        self.val_data = open_split(cfg.data.dir, "val", t.seq_len, scoring=True) \
            if t.eval_every or t.eval_at_start else None
        self.order = SampleOrder(len(self.train_data), seed=t.seed)
        self.progress = Progress(world_size=dist.size())
        self.lr_scale = 1.0  # elastic: world size / the size the job started with (linear scaling rule)
        self.stop_flag = StopFlag(cfg.train.stop_grace_s or MIN_GRACE_S)  # sized in run() when 0

    # ---- checkpoints -------------------------------------------------------------------------------------
    def resume(self, resume: Optional[str]) -> None:
        """Rank 0 reads the weights and the training state and broadcasts them (at stage 0 with the optimizer
        state); at stages 1 and 2 every rank reads all optimizer slices and keeps its own, resharded when the
        world size changed."""
        state = dist.run_on_main(lambda: self._load_on_main(resume), name="resume") if resume else None
        shared = dist.broadcast_object({k: state[k] for k in ("path", "progress", "rng")} if state else None,
                                       name="resume.state")
        dist.broadcast_state(self.model, self.optimizer, has_optimizer_state=shared is not None)
        if shared is None:
            return
        if self.optimizer.stage:
            self.optimizer.load_state_dict(checkpoint.read_optimizer_slices(Path(shared["path"])))
        self.progress = Progress.restore(shared["progress"], world_size=len(shared["rng"]),
                                         n_items=len(self.train_data))
        if self.progress.world_size != dist.size() and dist.is_main():
            show(f"resuming a run saved on {self.progress.world_size} rank(s) on {dist.size()}: the data continues "
                 f"at item {self.progress.samples:,} of the global sample order")
        self.progress.world_size = dist.size()
        rng = shared["rng"]
        set_rng_state(rng[dist.rank()] if dist.rank() < len(rng) else rng[0])

    def _load_on_main(self, resume: str) -> Optional[dict]:
        path = checkpoint.find_latest_checkpoint(self.run_dir) if resume == "auto" else \
            checkpoint.resolve_checkpoint(resume)
        if path is None:
            return None
        show(f"resuming from {path}")
        state = checkpoint.load_train_state(path)
        saved_stage, stage = state.get("zero_stage", 0), self.optimizer.stage
        if (saved_stage == 0) != (stage == 0):
            raise UserError(f"{path} was written at dist.zero_stage={saved_stage}; resume it with --set "
                            f"dist.zero_stage={saved_stage}{' (or the other sharded stage)' if saved_stage else ''}")
        if self.cfg.finetune.lora_rank:  # the base weights came from finetune.init_from
            load_lora_state_dict(self.model, torch.load(path / ADAPTER_FILE, map_location="cpu", weights_only=True))
        else:
            self.model.load_state_dict(checkpoint.read_model_checkpoint(path)[0])  # verified when found
        if stage == 0:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return {**state, "path": str(path)}

    def save(self) -> Optional[Path]:
        """Every rank calls this (collectives: the RNG gather, the optimizer slices); rank 0 writes the rest,
        every rank learns if it failed."""
        rngs = dist.allgather_object(rng_state(), name="ckpt.rng")
        path = self.run_dir / "checkpoints" / checkpoint.checkpoint_name(self.progress.step)
        slices = self._write_slices(path) if self.optimizer.stage else None
        return dist.run_on_main(lambda: self._write_checkpoint(path, rngs, slices), name="ckpt")

    def _write_slices(self, path: Path) -> dict:
        """Every rank writes its own optimizer slice into the checkpoint's staging folder, so no rank ever holds
        the whole optimizer state (the run dir must be on a filesystem all ranks share)."""
        staging = dist.broadcast_object(dist.run_on_main(lambda: str(checkpoint.begin_checkpoint(path)),
                                                         name="ckpt.begin"), name="ckpt.staging")
        name, digest, error = checkpoint.slice_name(dist.rank(), dist.size()), None, None
        try:
            if self.fault.at("diskfull", self.progress.step):
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            digest = checkpoint.write_torch(Path(staging) / name, self.optimizer.state_dict())
        except OSError as err:
            error = f"rank {dist.rank()}: {err}"
        return {"staging": Path(staging), "files": dist.allgather_object((name, digest, error), name="ckpt.slices")}

    def _write_checkpoint(self, path: Path, rngs: list, slices: Optional[dict]) -> Path:
        stage = self.optimizer.stage
        train_state = {"progress": asdict(self.progress), "rng": rngs, "zero_stage": stage,
                       "scaler": self.scaler.state_dict() if self.scaler else None}
        if stage == 0:
            train_state["optimizer"] = self.optimizer.state_dict()
        lora = self.cfg.finetune.lora_rank > 0  # LoRA checkpoints hold the small adapters alone
        weights = lora_state_dict(self.model) if lora else self.model.state_dict()
        try:
            if self.fault.at("diskfull", self.progress.step):
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            errors = [error for _, _, error in slices["files"] if error] if slices else []
            if errors:
                raise OSError(f"an optimizer slice could not be written ({errors[0]})")
            checkpoint.save_checkpoint(path, {k: v.float() for k, v in weights.items()}, self.cfg.to_dict(),
                                       tokenizer_path=Path(self.cfg.data.dir) / "tokenizer.model",
                                       train_state=train_state, step=self.progress.step,
                                       weights_file=ADAPTER_FILE if lora else "model.pt",
                                       staging=slices["staging"] if slices else None,
                                       written={n: d for n, d, _ in slices["files"]} if slices else None)
        except OSError as err:
            if slices:  # the ranks' slices are staged: nothing of this checkpoint may stay
                shutil.rmtree(slices["staging"], ignore_errors=True)
            previous = checkpoint.find_latest_checkpoint(self.run_dir)
            raise UserError(f"writing checkpoint {path.name} failed ({err}); the last good checkpoint, "
                            f"{previous or 'none'}, is intact") from None
        checkpoint.prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep)
        return path

    # ---- the loop ----------------------------------------------------------------------------------------
    def peak_flops(self) -> tuple[float, str]:
        """The job's peak and its source: per-rank peaks measured at the same moment and summed (ranks may
        share a CPU), or a known GPU's datasheet figure."""
        if self.cfg.log.peak_flops > 0:
            return self.cfg.log.peak_flops * dist.size(), "log.peak_flops"
        dtype = AUTOCAST_DTYPES.get(self.cfg.train.precision, torch.float32)
        dist.allreduce_sum(torch.zeros(1), name="peak.barrier")
        own, source = device_peak_flops(self.device, dtype)
        return dist.allreduce_sum(torch.tensor([own]), name="peak.sum").item(), source

    def run_elastic(self, logger: MetricsLogger) -> dict:
        """Horovod Elastic: train inside hvd.elastic.run; a lost or added worker rolls back to the last commit."""
        state = dist.elastic_state(self.model, self.optimizer, progress=asdict(self.progress),
                                   initial_size=dist.size())

        def on_reset():
            logger.set_enabled(dist.is_main(), state.progress["step"])  # rank 0 may be another process now
            self.lr_scale = dist.size() / state.initial_size
            logger.message(f"elastic reset: {dist.size()} ranks now, global batch "
                           f"{self.cfg.train.batch_size * self.cfg.train.grad_accum * dist.size()} sequences, "
                           f"learning rate x{self.lr_scale:.3g}; continuing from step {state.progress['step']}")

        def commit():
            state.progress = asdict(self.progress)  # a fresh dict: ObjectState keeps what it is given
            state.commit()

        state.register_reset_callbacks([on_reset])

        @dist.elastic_run
        def train(state):
            self.progress = replace(Progress(**state.progress), world_size=dist.size())
            self.lr_scale = dist.size() / state.initial_size
            logger.truncate_after(self.progress.step)  # steps after the last commit are trained again
            return self.run(logger, commit)

        return train(state)

    def run(self, logger: MetricsLogger, commit=None) -> dict:
        t, p = self.cfg.train, self.progress
        stream = StepBatches(self.train_data, self.order, dist.rank(), dist.size())
        self.tokens_per_step = t.batch_size * t.grad_accum * t.seq_len * dist.size()
        self.flops_per_token, (self.peak, peak_source) = self.model.flops_per_token(t.seq_len), self.peak_flops()
        logger.message(f"MFU peak: {format_flops(self.peak)} over {dist.size()} rank(s) ({peak_source})")
        stop = StopTime.begin(self.stop_flag, t.stop_grace_s, self.model, logger.last_save, dist,
                              self.fault.save_delay_s)
        session_start, first_step, record, bad_in_a_row = time.perf_counter(), p.step, {}, 0
        if t.eval_at_start and p.step == 0 and self.val_data is not None:
            logger.log_eval(0, self.validation(whole=False))
        while p.step < t.max_steps:
            step_start = time.perf_counter()
            lr = lr_at(p.step, self.cfg.optim, t.max_steps) * self.lr_scale
            set_lr(self.optimizer, lr)
            batches = stream.step(p.samples, t.batch_size, t.grad_accum)
            result = train_step(self.model, self.optimizer, batches, self.device, t.precision,
                                self.cfg.optim.grad_clip, self.scaler, poison=self.fault.at("nan", p.step + 1),
                                ranks=dist, loss_chunk=t.loss_chunk)
            # Horovod: one small allreduce per step carries the loss and the preemption vote together.
            loss_sum, stop_votes = dist.allreduce_sum(
                torch.tensor([result.loss_sum, float(self.stop_flag.requested)]), name="step.stats").tolist()
            p.step += 1
            p.samples += t.batch_size * t.grad_accum * dist.size()
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
            if self.fault.at("raise", p.step):
                raise RuntimeError(f"injected fault at step {p.step} (HVD_LLAMA_FAULT)")
            if self.fault.at("exit", p.step):
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
                  "elapsed_s": p.elapsed_s, "skipped": not result.stepped, "world_size": dist.size()}
        if self.scaler:
            record["loss_scale"] = self.scaler.scale
        if self.device.type == "cuda":  # this rank's peak since start-up (what the memory planner predicts)
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
    return len({repr(f) for f in dist.allgather_object(fingerprint, name="replicas")}) == 1


def default_run_dir(config_path: Optional[str]) -> Path:
    return Path("runs") / (Path(config_path).stem if config_path else "default")


def prepare_run_dir(run_dir: Path, resume: Optional[str], cfg: Config) -> None:
    """Rank 0: refuse to mix a fresh run into an old one; record the resolved config."""
    if not resume and checkpoint.list_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints: pass --resume auto to continue it, "
                        "or choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
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
    device = dist.init(cfg.dist, device_kind)
    allow_tf32(device, cfg.train.tf32)
    # Elastic: a worker added to a running job makes none of the start-up collectives; the state's sync
    # brings it up to date.
    joining = cfg.dist.elastic and dist.elastic_joining()
    if not joining:
        dist.run_on_main(lambda: prepare_run_dir(run_dir, args.resume, cfg), name="run_dir")
    init_state = load_pretrained(cfg, meta, joining) if cfg.finetune.init_from else None
    check_fits(cfg, dist.size(), device_memory(device), device.type)  # before allocating: every rank alike
    trainer = Trainer(cfg, run_dir, device, init_state, fault)
    if not joining:
        trainer.resume(args.resume)
    before, start = replace(trainer.progress), time.perf_counter()
    logger = MetricsLogger(run_dir, dist.is_main(), cfg.log.tensorboard, cfg.log.every,
                           resume_step=before.step if args.resume else None)
    if cfg.finetune.lora_rank:
        logger.message(lora_summary(trainer.model, cfg))
    logger.message(f"training {trainer.model.num_params():,} parameters on {dist.size()} rank(s), "
                   f"{device.type}, {cfg.train.precision}; {meta['splits']['train']['tokens']:,} train tokens; "
                   f"run dir {run_dir}; {dist.describe()}")
    try:
        record = trainer.run_elastic(logger) if cfg.dist.elastic else trainer.run(logger)
    finally:
        logger.close()
    identical = replicas_identical(trainer.model)
    logger.message(summary_line(record, before, trainer.progress, time.perf_counter() - start, run_dir, identical))
    if cfg.dist.elastic:
        dist.leave_elastic_job()


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        run_main(_main, argv)
    except Exception as err:  # a crash: name the rank, so the job's log says which one died first
        say(traceback.format_exc().rstrip())
        say(f"error: rank {rank_name()} failed: {type(err).__name__}: {err}")
        os._exit(1)  # do not wait for Horovod's background thread: the other ranks must see us gone


if __name__ == "__main__":
    main()
