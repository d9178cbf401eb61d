"""The training command: `horovodrun -np N python -m hvd_llama.train --config configs/tiny.yaml`.

N ranks train exactly the model one rank would train with an N-times larger batch: each rank reads its own share
of every step's items of one global sample order (training/data.py), the data-parallel optimizer averages the
gradients (hvd.DistributedOptimizer, or ZeRO stages 1-2: parallel/zero.py), and every rank applies the same
update (training/trainer.py). Only rank 0 writes the run's files (training/metrics.py; training/checkpointing.py,
where every rank writes its own optimizer slice). This module is the command: the run dir, resume, the summary.
"""
from __future__ import annotations

import argparse
import os
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import yaml

from hvd_llama import parallel
from hvd_llama.cli import UserError, run_main
from hvd_llama.config import Config, load_config
from hvd_llama.device import allow_tf32, resolve_device
from hvd_llama.files import atomic_write_text
from hvd_llama.parallel import elastic
from hvd_llama.procs import rank_name, say, show
from hvd_llama.training.builder import check_data, device_memory, load_pretrained, lora_summary
from hvd_llama.training.checkpointing import Progress
from hvd_llama.training.faults import Fault
from hvd_llama.training.memory import check_fits
from hvd_llama.training.metrics import MetricsLogger, format_duration
from hvd_llama.training.trainer import Trainer, replicas_identical, run_elastic
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
    parser.add_argument("--verify-data", action="store_true",
                        help="check every shard's checksum at start (same as data.verify=true)")
    return parser.parse_args(argv)


def default_run_dir(config_path: Optional[str]) -> Path:
    return Path("runs") / (Path(config_path).stem if config_path else "default")


def prepare_run_dir(run_dir: Path, resume: Optional[str], cfg: Config) -> None:
    """Rank 0: refuse to mix a fresh run into an old one, or to share the run dir with a live job (rank 0 holds
    the run dir's lock for the job's life); remove what killed saves left; record the resolved config."""
    if not resume and checkpoint.list_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints: pass --resume auto to continue it, "
                        "or choose another --run-dir")
    lock = checkpoint.RunDirLock(run_dir)
    removed = lock.remove_stale_saves()
    if removed:
        show(removed)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def summary_line(record: dict, before: Progress, after: Progress, seconds: float, run_dir: Path,
                 replicas_identical: Optional[bool]) -> str:
    """The last line a person reads: where the run ended, how good, how fast (this session's average)."""
    val = f" | val loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f}, {record['val_tokens']:,} tokens)" \
        if "val_loss" in record else ""
    replicas = {True: "replicas identical", False: "WARNING: replicas differ",
                None: "weights sharded (ZeRO stage 3)"}[replicas_identical]
    tokens_per_s = (after.tokens - before.tokens) / max(after.elapsed_s - before.elapsed_s, 1e-9)
    return (f"done: {after.step} steps ({after.step - before.step} this session) in {format_duration(seconds)}"
            f" | train loss {record.get('loss', float('nan')):.4f}{val} | {replicas}"
            f" | {tokens_per_s:,.0f} tok/s | run dir {run_dir}")


def _main(argv: Optional[Sequence[str]]) -> None:
    args = parse_args(argv)
    overrides = args.set + (["dist.elastic=true"] if args.elastic else []) + \
        (["data.verify=true"] if args.verify_data else []) + \
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
        record = run_elastic(trainer, logger) if cfg.dist.elastic else trainer.run(logger)
    finally:
        logger.close()
    identical = replicas_identical(trainer.model, cfg.dist.zero_stage)
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
