"""Everything Horovod: the only module that imports it.

Follows Horovod's PyTorch examples (examples/pytorch/pytorch_imagenet_resnet50.py): init, pin the device,
wrap the optimizer, broadcast the initial state from rank 0, and average metrics across ranks.
zero.py holds the data-parallel optimizers: replicated (stage 0) and ZeRO-sharded (stages 1 and 2).
"""
from __future__ import annotations

import copy
import os
import socket
from typing import Any, Callable, Optional, Sequence

import torch

try:
    import horovod.torch as hvd
    from horovod.common.elastic import ObjectState
except ImportError as err:  # pip cannot build Horovod 0.28.1 for torch >= 2.1 unpatched; the installer can
    raise ImportError(f"Horovod is missing or not built for this torch ({err}); run launch/install.sh") from None

from hvd_llama.cli import UserError
from hvd_llama.config import DistConfig
from hvd_llama.device import cuda_device_index, gpu_uuid, shared_gpu
from hvd_llama.sharding import backward_buckets, merge_slices  # noqa: F401 (public)
from hvd_llama.dist.zero import ReplicatedOptimizer, ShardedOptimizer, allgather_tensor  # noqa: F401

ZERO_STAGES = (0, 1, 2)


# What each launcher tells its processes about the world it started, in the order they are trusted: a launcher
# started inside another (mpirun in a Slurm allocation) sets its own variable. SLURM_STEP_NUM_TASKS, not
# SLURM_NTASKS: srun sets it for the tasks of its step, while SLURM_NTASKS is also set in the batch script
# itself, where one process may legitimately run alone or start its own launcher.
LAUNCHER_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")


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
                                  bucket_elements: int = 0):
    """AdamW over `param_groups` (optim.param_groups) with `optim_kwargs` (lr, betas, eps), data parallel:
    stage 0 replicated (hvd.DistributedOptimizer), 1 optimizer state sharded, 2 gradients sharded too.
    Every stage has the interface of dist/zero.py: param_groups, reduce_gradients, scale_gradients,
    clip_grad_norm_, step, zero_grad, state_dict, load_state_dict, state_bytes.
    """
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage!r}")
    if stage == 0:
        optimizer = torch.optim.AdamW(param_groups, **optim_kwargs, fused=fused or None)
        return ReplicatedOptimizer(wrap_optimizer(optimizer, model, cfg, grad_accum), model)
    return ShardedOptimizer(model, param_groups, optim_kwargs, stage, grad_accum, compression=_compression(cfg),
                            gradient_predivide_factor=cfg.gradient_predivide_factor, fused=fused,
                            bucket_elements=bucket_elements)


def broadcast_state(model: torch.nn.Module, optimizer, has_optimizer_state: bool) -> None:
    """Horovod: make every rank start from rank 0's weights (and, at stage 0, its optimizer state after a
    resume; a sharded optimizer's ranks each load their own slice).

    The optimizer state is broadcast only when rank 0 has some: on an empty AdamW state Horovod runs a dummy
    step (applying weight decay once and starting the step counter at 1), which would make step 1 differ from
    a plain PyTorch loop. That dummy step also touches the other ranks' weights, so the weights go last.
    """
    _broadcast(model, optimizer.optimizer if has_optimizer_state and optimizer.stage == 0 else None)


def _broadcast(model: torch.nn.Module, torch_optimizer) -> None:
    if torch_optimizer is not None:
        hvd.broadcast_optimizer_state(torch_optimizer, root_rank=0)
    # Horovod has no bfloat16: bf16 weights (sharded bf16 runs) travel bit-exactly as int16 views of themselves.
    hvd.broadcast_parameters({name: t.view(torch.int16) if t.dtype == torch.bfloat16 else t
                              for name, t in model.state_dict().items()}, root_rank=0)


def host_copy(value, previous=None):
    """A copy of a state_dict tree (dicts, lists, tensors, numbers) in host memory: CUDA tensors go to pinned
    buffers, copied asynchronously. `previous`, an earlier copy of the same tree, lends its buffers where the
    shapes match (pinning memory at every commit would cost more than the copy)."""
    if isinstance(value, torch.Tensor):
        reuse = isinstance(previous, torch.Tensor) and previous.shape == value.shape and previous.dtype == value.dtype
        if reuse:
            return previous.copy_(value, non_blocking=value.is_cuda)
        if value.is_cuda:
            return torch.empty(value.shape, dtype=value.dtype, pin_memory=True).copy_(value, non_blocking=True)
        return value.detach().clone()
    if isinstance(value, dict):
        old = previous if isinstance(previous, dict) else {}
        return {key: host_copy(item, old.get(key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        old = previous if isinstance(previous, type(value)) and len(previous) == len(value) else [None] * len(value)
        return type(value)(host_copy(item, before) for item, before in zip(value, old))
    return copy.deepcopy(value)


class _ElasticState(ObjectState):
    """Horovod Elastic's state of a training run, as hvd.elastic.TorchState keeps it, with two differences.

    Committed copies live in host memory (pinned when CUDA): TorchState deep-copies the model and optimizer
    state on their device at every commit, +12 bytes per parameter of GPU memory with AdamW.
    The data position is a plain value (train.Progress), so there is no sampler to keep.
    Its sync skips Horovod's dummy optimizer step on an empty state: TorchState syncs the optimizer with
    broadcast_optimizer_state, which at the first sync (empty AdamW state) applies weight decay once on every
    rank, and a worker joining later would have its freshly synced weights moved by it. broadcast_state avoids both.
    """

    def __init__(self, model, optimizer, **values):
        self._model, self._optimizer, self._committed = model, optimizer, None
        self._after_reset = False
        super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank, **values)
        self._save_tensors()

    def _save_tensors(self):
        old_model, old_optimizer = self._committed or (None, None)
        self._committed = (host_copy(self._model.state_dict(), old_model),
                           host_copy(self._optimizer.state_dict(), old_optimizer))
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the asynchronous copies to pinned memory are complete

    def save(self):
        self._save_tensors()
        super().save()

    def restore(self):
        model_state, optimizer_state = self._committed
        self._model.load_state_dict(model_state)  # copies into the parameters, on their device
        # load_state_dict adopts CPU tensors as they are (no copy): training would then update the committed copy
        self._optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        super().restore()

    def reset(self):
        self._after_reset = True

    def sync(self):
        if self._after_reset:  # any worker this reset added waits in elastic_joining(): rank 0 answers it
            broadcast_object(True, name=JOINING)
            self._after_reset = False
        has_state = broadcast_object(len(self._optimizer.state) > 0, name="elastic.has_state")
        _broadcast(self._model, self._optimizer if has_state else None)
        super().sync()  # the plain Python values


def elastic_state(model, optimizer, **values) -> ObjectState:
    """`optimizer`: a stage-0 data-parallel optimizer (elastic needs replicated state: Horovod re-syncs it by
    broadcast from rank 0)."""
    return _ElasticState(model, optimizer.optimizer, **values)


elastic_run = hvd.elastic.run
JOINING = "elastic.joining"


def elastic_joining() -> bool:
    """Horovod Elastic: whether this worker joins a job that is already training (a host added, or back after
    its blacklist cooldown) rather than starting with the others. Horovod runs the whole script on a new
    worker while the others, back from their reset, go straight to the state's sync: a newcomer that made the
    start-up collectives (run dir, pretrained weights, resume) would wait in them forever, and so would the
    others in the sync. Every worker calls this right after init; the workers already training make the same
    collective first in their sync after a reset, where rank 0 (never a newcomer: Horovod ranks the hosts it
    had first) answers True."""
    return broadcast_object(False, name=JOINING)


def leave_elastic_job() -> None:
    """End an elastic worker's process now that everything it wrote is flushed: Horovod shuts down, then the
    process exits without Python's finalization. Seen here: workers that horovodrun's elastic driver stopped
    with SIGTERM (a scheduler's signal to the job) checkpointed, printed their summary, and then hung in the
    interpreter's final garbage collection, under load, until the driver SIGKILLed them 5 s later and the
    job reported failure."""
    hvd.shutdown()
    os._exit(0)


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
