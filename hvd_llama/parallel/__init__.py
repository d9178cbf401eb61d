"""Everything Horovod: the only module that imports it.

Follows Horovod's PyTorch examples (examples/pytorch/pytorch_imagenet_resnet50.py): init, pin the device,
wrap the optimizer, broadcast the initial state from rank 0, and average metrics across ranks.
zero.py holds the data-parallel optimizers: replicated (stage 0) and ZeRO-sharded (stages 1 and 2).
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable, Optional, Sequence

import torch

try:
    import horovod.torch as hvd
except ImportError as err:  # pip cannot build Horovod 0.28.1 for torch >= 2.1 unpatched; the installer can
    raise ImportError(f"Horovod is missing or not built for this torch ({err}); run launch/install.sh") from None

from hvd_llama.cli import UserError
from hvd_llama.config import DistConfig
from hvd_llama.device import cuda_device_index, gpu_uuid, shared_gpu
from hvd_llama.parallel.zero import ReplicatedOptimizer, ShardedOptimizer
from hvd_llama.parallel.zero3 import FullyShardedOptimizer, ShardedParameters
from hvd_llama.procs import LAUNCHER_ENV
from hvd_llama.training.optim import DataParallelOptimizer
from hvd_llama.training.zero_layout import backward_buckets

ZERO_STAGES = (0, 1, 2, 3)


# The world sizes launchers other than horovodrun report, in the order they are trusted: a launcher started inside
# another (mpirun in a Slurm allocation) sets its own variable.
LAUNCHER_SIZE_VARIABLES = tuple(size for _, _, size in LAUNCHER_ENV[1:])


def check_world_size(size: int, env) -> None:
    """Stop when the launcher started more processes than Horovod's world holds.

    If the MPI wire-up fails (srun without --mpi=pmix, a Horovod without MPI), every task initialises as a
    world of its own: N "rank 0"s would each train alone and write one run dir. horovodrun (HOROVOD_RANK set)
    builds the world itself, with its own rendezvous, and is not checked.
    """
    if "HOROVOD_RANK" in env:
        return
    for name in LAUNCHER_SIZE_VARIABLES:
        value = env.get(name, "")
        if value.isdigit():
            if int(value) > size:
                raise UserError(f"the launcher started {value} processes ({name}={value}) but Horovod's world has "
                                f"{size}: MPI did not connect them (srun: --mpi=pmix; is Horovod built with MPI? "
                                "horovodrun --check-build)")
            return


# On CPU ranks the cores are the compute, and Horovod's background thread takes them while it waits: it
# coordinates with every rank each HOROVOD_CYCLE_TIME (1 ms by default) even with nothing to reduce, and
# Open MPI busy-polls inside those calls unless told to yield. Measured idle on the quiet machine (2 ranks, 1
# compute thread each, README "Scaling"): the background threads used 6-7% of a core at 1 ms under Gloo, 35-37%
# under MPI; with these settings 0.6-5%. A launcher's or user's own setting (horovodrun --cycle-time-ms) wins.
CPU_HOROVOD_ENV = {"HOROVOD_CYCLE_TIME": "5", "OMPI_MCA_mpi_yield_when_idle": "1"}


def cpu_defaults(env) -> dict:
    """Set CPU_HOROVOD_ENV's values that `env` does not have yet (before hvd.init, which reads them)."""
    applied = {k: v for k, v in CPU_HOROVOD_ENV.items() if k not in env}
    env.update(applied)
    return applied


def init(cfg: DistConfig, device: str, check_gpus: bool = True) -> torch.device:
    """Start Horovod and give this rank its device (a GPU, or a fair share of the CPU cores). On GPUs every rank
    stops alike, in one line, on gpu_error's findings (`check_gpus` False: the caller reports them itself). Not
    under Horovod Elastic: a worker added to a running job starts here while the others wait in their state's
    sync (see elastic_joining), and it would wait in this collective for ever."""
    if device != "cuda":
        cpu_defaults(os.environ)
    hvd.init()
    check_world_size(hvd.size(), os.environ)
    # Horovod: ranks on one node share its cores; more threads than cores makes every rank slower (on a GPU
    # node too: each rank's host work, the data loader's included, would otherwise take every core).
    torch.set_num_threads(cfg.threads_per_rank or max(1, (os.cpu_count() or 1) // hvd.local_size()))
    if device == "cuda":
        # Horovod: pin each process to one GPU, its local rank's among those it sees.
        index = cuda_device_index(hvd.local_rank(), hvd.local_size(), torch.cuda.device_count(),
                                  os.environ.get("CUDA_VISIBLE_DEVICES"))
        torch.cuda.set_device(index)
        error = gpu_error(gpu_placements(index)) if check_gpus and not cfg.elastic else None
        if error:
            raise UserError(error)
        return torch.device("cuda", index)
    return torch.device("cpu")


def gpu_placements(index: int) -> list:
    """Every rank's (host, UUID of the GPU it pinned, whether its Horovod has NCCL), in rank order: a collective."""
    mine = (socket.gethostname(), gpu_uuid(index), bool(hvd.nccl_built()))
    return [tuple(placement) for placement in allgather_object(mine, name="init.gpus")]


def gpu_error(placements: Sequence[tuple[str, Optional[str], bool]]) -> Optional[str]:
    """Why these ranks (gpu_placements) cannot train together on their GPUs, in one line, else None.

    Two ranks of a node on one GPU (device.shared_gpu), or, with more than one rank, a Horovod without NCCL:
    every collective of GPU tensors would be copied through host memory. A CUDA torch without the CUDA toolkit
    (no nvcc) builds one: launch/install.sh notes it once, and the job would otherwise run slowly and silently.
    """
    shared = shared_gpu([(host, uuid) for host, uuid, _ in placements])
    without = sorted({host for host, _, nccl in placements if not nccl})
    if shared or len(placements) == 1 or not without:
        return shared
    return (f"Horovod on {', '.join(without)} was built without NCCL (hvd.nccl_built() is 0): every collective of "
            "GPU tensors would go through host memory; rebuild it with launch/install.sh --cuda (it needs the CUDA "
            "toolkit: CUDA_HOME or nvcc on PATH)")


def describe() -> str:
    """The controller and the background loop's cycle this job runs with, for the start-up line."""
    controller = "MPI" if hvd.mpi_enabled() else "Gloo"
    return f"Horovod {controller} controller, cycle {os.environ.get('HOROVOD_CYCLE_TIME', '1')} ms"


def rank() -> int:
    return hvd.rank()


def size() -> int:
    return hvd.size()


def local_size() -> int:
    """Ranks on this node."""
    return hvd.local_size()


def is_main() -> bool:
    return hvd.rank() == 0


def _compression(cfg: DistConfig):
    return hvd.Compression.fp16 if cfg.compression == "fp16" else hvd.Compression.none


def gradient_groups(params: list, bucket_elements: int):
    """Horovod's `groups`: one grouped allreduce per bucket of parameters, launched when backward has produced
    all of the bucket's gradients (DDP's buckets). Measured on `small` here (README "Scaling"): 2-3 fused
    allreduces per step instead of ~40 cycle-sized ones, 47-86 ms of allreduce per step instead of 117-199."""
    if not bucket_elements:
        return None  # Horovod's own fusion of what is ready each cycle
    return [params[first:last] for first, last in backward_buckets([p.numel() for p in params], bucket_elements)]


def wrap_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, cfg: DistConfig,
                   grad_accum: int) -> torch.optim.Optimizer:
    """Horovod: allreduce gradients during backward; accumulate `grad_accum` passes locally first."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # Per-cycle fusion instead of groups where groups go wrong: an elastic job's grouped allreduces stall once
    # it has grown back (a worker re-added after a reset: tests/test_elastic.py hung at its regrow), and
    # Horovod 0.28.1's grouped allreduce drops gradient_predivide_factor (_grouped_allreduce_grad_async
    # passes no prescale or postscale factor).
    grouped = not cfg.elastic and cfg.gradient_predivide_factor == 1.0
    return hvd.DistributedOptimizer(
        optimizer,
        named_parameters=named,
        groups=gradient_groups([p for _, p in named], cfg.allreduce_bucket_elements) if grouped else None,
        compression=_compression(cfg),
        backward_passes_per_step=grad_accum,
        op=hvd.Average,
        gradient_predivide_factor=cfg.gradient_predivide_factor,
    )


def build_data_parallel_optimizer(model: torch.nn.Module, param_groups: list[dict], optim_kwargs: dict,
                                  cfg: DistConfig, stage: int, grad_accum: int, fused: bool = False,
                                  bucket_elements: int = 0,
                                  shards: Optional[ShardedParameters] = None) -> DataParallelOptimizer:
    """AdamW over `param_groups` (optim.param_groups) with `optim_kwargs` (lr, betas, eps), data parallel:
    stage 0 replicated (hvd.DistributedOptimizer), 1 optimizer state sharded, 2 gradients sharded too, 3 the
    parameters too (`shards`: the model's ShardedParameters)."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage!r}")
    if stage == 0:
        optimizer = torch.optim.AdamW(param_groups, **optim_kwargs, fused=fused or None)
        return ReplicatedOptimizer(wrap_optimizer(optimizer, model, cfg, grad_accum), model)
    options = dict(grad_accum=grad_accum, compression=_compression(cfg), fused=fused,
                   gradient_predivide_factor=cfg.gradient_predivide_factor, bucket_elements=bucket_elements)
    if stage == 3:
        return FullyShardedOptimizer(model, shards, param_groups, optim_kwargs, **options)
    return ShardedOptimizer(model, param_groups, optim_kwargs, stage, **options)


def broadcast_state(model: torch.nn.Module, optimizer, has_optimizer_state: bool) -> None:
    """Horovod: make every rank start from rank 0's weights (and, at stage 0, its optimizer state after a
    resume; a sharded optimizer's ranks each load their own slice).

    The optimizer state is broadcast only when rank 0 has some: on an empty AdamW state Horovod runs a dummy
    step (applying weight decay once and starting the step counter at 1), which would make step 1 differ from
    a plain PyTorch loop. That dummy step also touches the other ranks' weights, so the weights go last.
    """
    if optimizer.stage == 3:
        return  # no weight is replicated: every rank initialised or loaded its own slices
    _broadcast(model, optimizer.optimizer if has_optimizer_state and optimizer.stage == 0 else None)


def _broadcast(model: torch.nn.Module, torch_optimizer) -> None:
    if torch_optimizer is not None:
        hvd.broadcast_optimizer_state(torch_optimizer, root_rank=0)
    # Horovod has no bfloat16: bf16 weights (sharded bf16 runs) travel bit-exactly as int16 views of themselves.
    hvd.broadcast_parameters({name: t.view(torch.int16) if t.dtype == torch.bfloat16 else t
                              for name, t in model.state_dict().items()}, root_rank=0)


def broadcast_object(obj: Any, name: str) -> Any:
    return hvd.broadcast_object(obj, root_rank=0, name=name)


def allgather_object(obj: Any, name: str) -> list:
    return hvd.allgather_object(obj, name=name)


def allreduce_sum(values: torch.Tensor, name: str) -> torch.Tensor:
    """Sum a small float64 tensor of statistics over ranks (exact for counts, order-stable for sums)."""
    return hvd.allreduce(values.double().cpu(), op=hvd.Sum, name=name)


def run_on_main(fn: Callable[[], Any], name: str) -> Any:
    """Run `fn` on rank 0 only (a rank-0 side effect); every rank raises what it raised, if anything: a UserError
    as itself, any other error on rank 0 as itself and on the others as a RuntimeError naming it.

    Without this, a rank-0 failure would leave the other ranks waiting in their next collective forever.
    """
    result, error, failure = None, None, None
    if is_main():
        try:
            result = fn()
        except UserError as err:
            error = ("user", str(err))
        except Exception as err:  # noqa: BLE001 (re-raised below, after every rank has heard of it)
            failure, error = err, ("crash", f"{type(err).__name__}: {err}")
    error = broadcast_object(error, name=f"{name}.error")
    if failure is not None:
        raise failure
    if error:
        kind, message = error
        raise UserError(message) if kind == "user" else RuntimeError(f"rank 0 failed ({name}): {message}")
    return result


def run_on_all(fn: Callable[[], Any], name: str) -> Any:
    """Run `fn` on every rank; if it raised a UserError on any rank, every rank raises the first one (by rank),
    so that no rank goes on alone into a collective the others never reach."""
    result, error = None, None
    try:
        result = fn()
    except UserError as err:
        error = str(err)
    errors = [e for e in allgather_object(error, name=f"{name}.errors") if e]
    if errors:
        raise UserError(errors[0])
    return result
