"""Timed training steps, each measurement in processes of its own; started by hvd_llama.bench.

    python -m hvd_llama.bench.train_steps throughput --json OUT          # plain PyTorch vs Horovod with one rank
    horovodrun --gloo -np N -H localhost:N python -m hvd_llama.bench.train_steps horovod|memory --json-dir DIR
    python -m torch.distributed.run --standalone --nproc-per-node N -m hvd_llama.bench.train_steps ddp|fsdp --json-dir DIR

Every process times whole steps after warm-up and writes the raw seconds as JSON; hvd_llama.bench turns them
into tokens/s, MFU and scaling figures. The tokens are random: a step costs the same whatever they are.
Processes of their own because Horovod starts once per process, and because its start-up outside a launcher
(singleton MPI) leaves variables in the environment that would confuse jobs launched afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from hvd_llama import parallel
from hvd_llama.bench.common import PHASES
from hvd_llama.cli import run_main
from hvd_llama.config import Config, load_config
from hvd_llama.device import measure_peak_flops
from hvd_llama.files import atomic_write_text
from hvd_llama.model import Transformer
from hvd_llama.procs import peak_rss
from hvd_llama.training.builder import build_training
from hvd_llama.training.compute import train_step
from hvd_llama.training.memory import with_train
from hvd_llama.training.optim import build_optimizer

PRECISION = "fp32"  # what every benchmarked step computes in (the presets' precision on CPU)


def random_batch(cfg: Config, seed: int) -> torch.Tensor:
    """[batch_size, seq_len + 1] random token ids: inputs are [:, :-1], targets [:, 1:]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len + 1),
                         generator=generator)


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())


def reference_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
                   grad_clip: float) -> torch.Tensor:
    """The plain PyTorch training step hvd_llama is measured against (nanoGPT's loop, no Horovod); its loss."""
    loss = next_token_loss(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def forward_backward(model: torch.nn.Module, batch: torch.Tensor) -> None:
    next_token_loss(model, batch).backward()
    model.zero_grad(set_to_none=True)


def timed(step: Callable[[], object], warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return seconds


class MethodTimer:
    """Replaces one method of a data-parallel optimizer with itself: adds up the seconds of its calls, then runs
    `then()` (a memory probe) after each. Wrapping reduce_gradients(), which train_step calls after backward,
    times the wait for the gradient allreduces or reduce-scatters (they start during backward, so only the part
    that backward did not hide is counted); step() at stages 1-2 includes the all-gather of the weights."""

    def __init__(self, optimizer, method: str, then: Optional[Callable[[], None]] = None):
        self.seconds = 0.0
        self._call, self._then = getattr(optimizer, method), then
        setattr(optimizer, method, self)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        result = self._call(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        if self._then:
            self._then()
        return result


def new_model(cfg: Config) -> Transformer:
    torch.manual_seed(cfg.train.seed)
    return Transformer(cfg.model)


def horovod_model(cfg: Config) -> tuple[Transformer, object]:
    """hvd_llama's own set-up, as training builds it (after parallel.init), at cfg.dist.zero_stage, for steps of
    one micro-batch: rank 0 initialises, bf16 weights with bf16 and a sharded optimizer, weights broadcast from
    rank 0."""
    built = build_training(with_train(cfg, grad_accum=1), torch.device("cpu"), initialise=parallel.is_main())
    parallel.broadcast_state(built.model, built.optimizer, has_optimizer_state=False)
    return built.model, built.optimizer


def measure_throughput(cfg: Config, args: argparse.Namespace) -> dict:
    """One process: the machine's matmul peak, then the reference step, hvd_llama's step under Horovod with
    one rank, and forward+backward alone, interleaved round by round so that a change in the machine's load
    hits all three alike."""
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    peak = max(measure_peak_flops(cpu, n=args.peak_n, seconds=args.peak_s) for _ in range(3))
    device = parallel.init(replace(cfg.dist, threads_per_rank=threads), "cpu")
    batch = random_batch(cfg, cfg.train.seed)
    clip = cfg.optim.grad_clip
    reference = new_model(cfg)
    reference_optimizer = build_optimizer(reference, cfg.optim)
    model, optimizer = horovod_model(cfg)
    steps = {
        "reference": lambda: reference_step(reference, reference_optimizer, batch, clip),
        "horovod": lambda: train_step(model, optimizer, [batch], device, PRECISION, clip, ranks=parallel),
        "forward_backward": lambda: forward_backward(reference, batch),
    }
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            seconds[name] += timed(step, args.warmup, args.steps)
    return {"peak_flops": peak, "peak_matmul_n": args.peak_n, "threads": torch.get_num_threads(),
            "horovod_size": parallel.size(), "step_s": seconds}


def measure_horovod_rank(cfg: Config, args: argparse.Namespace) -> dict:
    """One rank of a horovodrun job: hvd_llama's train_step at cfg.dist.zero_stage, with the seconds of each
    optimizer call after backward (allreduce_s: the wait in reduce_gradients)."""
    device = parallel.init(cfg.dist, "cpu")
    model, optimizer = horovod_model(cfg)
    timers = {phase: MethodTimer(optimizer, phase) for phase in PHASES}
    batch = random_batch(cfg, cfg.train.seed + parallel.rank())
    step_s, phase_s, losses = [], {phase: [] for phase in PHASES}, []
    for i in range(args.warmup + args.steps):
        for timer in timers.values():
            timer.seconds = 0.0
        start = time.perf_counter()
        result = train_step(model, optimizer, [batch], device, PRECISION, cfg.optim.grad_clip, ranks=parallel)
        losses.append(result.loss_sum / batch[:, 1:].numel())  # this rank's mean, as a plain loop computes it
        if i >= args.warmup:
            step_s.append(time.perf_counter() - start)
            for phase, timer in timers.items():
                phase_s[phase].append(timer.seconds)
    return {"rank": parallel.rank(), "size": parallel.size(), "zero_stage": optimizer.stage,
            "threads": torch.get_num_threads(), "step_s": step_s, "allreduce_s": phase_s["reduce_gradients"],
            "phase_s": phase_s, "losses": losses, "peak_rss": peak_rss()}


def measure_memory_rank(cfg: Config, args: argparse.Namespace) -> dict:
    """One rank of a horovodrun job: warm-up + timed training steps at cfg.dist.zero_stage, then this process's
    peak resident memory and the optimizer's state_bytes() right after reduce_gradients() and after step() of
    the last step (gradients peak at the former; AdamW's state exists from the first step on)."""
    parallel.init(cfg.dist, "cpu")
    rss_at_init = peak_rss()  # Python, torch, Horovod: what the planner calls the fixed overhead on a CPU
    model, optimizer = horovod_model(cfg)
    state: dict[str, dict] = {}
    for phase in ("reduce_gradients", "step"):
        MethodTimer(optimizer, phase, then=lambda phase=phase: state.update({phase: optimizer.state_bytes()}))
    batch = random_batch(cfg, cfg.train.seed + parallel.rank())
    for _ in range(args.warmup + args.steps):  # in the config's precision: memory depends on it
        train_step(model, optimizer, [batch], torch.device("cpu"), cfg.train.precision, cfg.optim.grad_clip,
                   ranks=parallel)
    return {"rank": parallel.rank(), "size": parallel.size(), "zero_stage": optimizer.stage,
            "threads": torch.get_num_threads(), "peak_rss": peak_rss(), "rss_at_init": rss_at_init,
            "state_bytes_after_reduce_gradients": state["reduce_gradients"], "state_bytes_after_step": state["step"]}


@contextmanager
def gloo_rank(cfg: Config) -> Iterator[tuple[int, int]]:
    """(rank, world size) of a torch.distributed Gloo process group under torchrun, with this rank's threads (the
    node's cores shared among its ranks unless dist.threads_per_rank says); the group is ended on leaving."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo")
    size = tdist.get_world_size()
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    torch.set_num_threads(cfg.dist.threads_per_rank or max(1, len(os.sched_getaffinity(0)) // local_size))
    yield tdist.get_rank(), size
    tdist.barrier()
    tdist.destroy_process_group()


def measure_ddp_rank(cfg: Config, args: argparse.Namespace) -> dict:
    """One rank of torch.distributed DistributedDataParallel over Gloo, the usual alternative to Horovod:
    the reference step with gradient allreduce, then the same step under no_sync() (no communication)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    with gloo_rank(cfg) as (rank, size):
        model = new_model(cfg)
        ddp = DistributedDataParallel(model, bucket_cap_mb=args.bucket_cap_mb)
        if cfg.dist.compression == "fp16":
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        optimizer = build_optimizer(model, cfg.optim)
        batch = random_batch(cfg, cfg.train.seed + rank)

        def step():
            reference_step(ddp, optimizer, batch, cfg.optim.grad_clip)

        step_s = timed(step, args.warmup, args.steps)
        with ddp.no_sync():
            no_sync_step_s = timed(step, args.warmup, args.steps)
    return {"rank": rank, "size": size, "threads": torch.get_num_threads(), "step_s": step_s,
            "no_sync_step_s": no_sync_step_s, "bucket_cap_mb": args.bucket_cap_mb}


def measure_fsdp_rank(cfg: Config, args: argparse.Namespace) -> dict:
    """One rank of PyTorch FSDP2 over Gloo, ZeRO-3 as torchtitan applies it: fully_shard on every block, then on
    the root, each resharding after forward; the reference step (its clip_grad_norm_ takes the global norm of the
    sharded gradients) from the same initial weights and batches as hvd_llama's."""
    from torch.distributed.fsdp import fully_shard

    with gloo_rank(cfg) as (rank, size):
        model = new_model(cfg)
        for layer in model.layers:
            fully_shard(layer, reshard_after_forward=True)
        fully_shard(model, reshard_after_forward=True)
        optimizer = build_optimizer(model, cfg.optim)
        batch, losses = random_batch(cfg, cfg.train.seed + rank), []
        step_s = timed(lambda: losses.append(reference_step(model, optimizer, batch, cfg.optim.grad_clip).item()),
                       args.warmup, args.steps)
    return {"rank": rank, "size": size, "threads": torch.get_num_threads(), "step_s": step_s, "losses": losses,
            "peak_rss": peak_rss()}


MEASUREMENTS = {"throughput": measure_throughput, "horovod": measure_horovod_rank, "memory": measure_memory_rank,
                "ddp": measure_ddp_rank, "fsdp": measure_fsdp_rank}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hvd_llama.bench.train_steps", description=__doc__.split("\n\n")[0])
    parser.add_argument("measurement", choices=MEASUREMENTS)
    parser.add_argument("--config", help="YAML config (model, batch, optimizer)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--rounds", type=int, default=2, help="throughput: rounds of the interleaved variants")
    parser.add_argument("--threads", type=int, default=0, help="throughput: torch threads; 0 = all usable cores")
    parser.add_argument("--peak-n", type=int, default=2048, help="throughput: size of the square peak matmul")
    parser.add_argument("--peak-s", type=float, default=1.0, help="throughput: seconds per peak measurement")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0, help="ddp: gradient bucket size")
    parser.add_argument("--json", type=Path, help="output file (throughput)")
    parser.add_argument("--json-dir", type=Path, help="output folder, one rank<N>.json per rank (horovod, memory, ddp, "
                                                      "fsdp)")
    return parser.parse_args(argv)


def _main(argv: Optional[Sequence[str]]) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    result = MEASUREMENTS[args.measurement](cfg, args)
    path = args.json if args.json else args.json_dir / f"rank{result['rank']}.json"
    atomic_write_text(path, json.dumps(result) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(_main, argv)


if __name__ == "__main__":
    main()
