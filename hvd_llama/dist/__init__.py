"""Everything Horovod: the only module that imports it.

Follows Horovod's PyTorch examples (examples/pytorch/pytorch_imagenet_resnet50.py): init, pin the device,
wrap the optimizer, broadcast the initial state from rank 0, and average metrics across ranks.
zero.py holds the data-parallel optimizers: replicated (stage 0) and ZeRO-sharded (stages 1 and 2).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

try:
    import horovod.torch as hvd
except ImportError as err:  # pip cannot build Horovod 0.28.1 for torch >= 2.1 unpatched; the installer can
    raise ImportError(f"Horovod is missing or not built for this torch ({err}); run launch/install.sh") from None

from hvd_llama.cli import UserError
from hvd_llama.config import DistConfig
from hvd_llama.dist.layout import merge_slices  # noqa: F401 (public: full optimizer state of a sharded checkpoint)
from hvd_llama.dist.zero import (DEFAULT_BUCKET_ELEMENTS, ReplicatedOptimizer, ShardedOptimizer,  # noqa: F401
                                 allgather_tensor)

ZERO_STAGES = (0, 1, 2)


def init(cfg: DistConfig, device: str) -> torch.device:
    """Start Horovod and give this rank its device (a GPU, or a fair share of the CPU cores)."""
    hvd.init()
    if device == "cuda":
        # Horovod: pin each process to one GPU (its local rank).
        torch.cuda.set_device(hvd.local_rank())
        return torch.device("cuda", hvd.local_rank())
    # Horovod: ranks on one node share its cores; more threads than cores makes every rank slower.
    threads = cfg.threads_per_rank or max(1, (os.cpu_count() or 1) // hvd.local_size())
    torch.set_num_threads(threads)
    return torch.device("cpu")


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


def wrap_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, cfg: DistConfig,
                   grad_accum: int) -> torch.optim.Optimizer:
    """Horovod: allreduce gradients during backward; accumulate `grad_accum` passes locally first."""
    op = hvd.Adasum if cfg.op == "adasum" else hvd.Average
    return hvd.DistributedOptimizer(
        optimizer,
        named_parameters=[(n, p) for n, p in model.named_parameters() if p.requires_grad],
        compression=_compression(cfg),
        backward_passes_per_step=grad_accum,
        op=op,
        gradient_predivide_factor=cfg.gradient_predivide_factor,
    )


def build_data_parallel_optimizer(model: torch.nn.Module, param_groups: list[dict], optim_kwargs: dict,
                                  cfg: DistConfig, stage: int, grad_accum: int, fused: bool = False,
                                  bucket_elements: int = DEFAULT_BUCKET_ELEMENTS):
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
    if cfg.op != "average":
        raise ValueError(f"dist.op={cfg.op} needs whole gradients on every rank; sharding (stage {stage}) "
                         "reduce-scatters them with op=average")
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


class _ElasticState(hvd.elastic.TorchState):
    """hvd.elastic.TorchState whose sync skips Horovod's dummy optimizer step on an empty state.

    TorchState syncs the model, then the optimizer with broadcast_optimizer_state: at the first sync (empty
    AdamW state) that applies weight decay once on every rank, and a worker joining later would have its
    freshly synced weights moved by it. broadcast_state avoids both.
    """

    def sync(self):
        has_state = broadcast_object(len(self.optimizer.state) > 0, name="elastic.has_state")
        _broadcast(self.model, self.optimizer if has_state else None)
        super(hvd.elastic.TorchState, self).sync()  # the plain Python values (ObjectState)


def elastic_state(model, optimizer, **values) -> hvd.elastic.TorchState:
    """`optimizer`: a stage-0 data-parallel optimizer (elastic needs replicated state: Horovod re-syncs it by
    broadcast from rank 0)."""
    return _ElasticState(model=model, optimizer=optimizer.optimizer, **values)


elastic_run = hvd.elastic.run


def broadcast_object(obj: Any, name: str) -> Any:
    return hvd.broadcast_object(obj, root_rank=0, name=name)


def allgather_object(obj: Any, name: str) -> list:
    return hvd.allgather_object(obj, name=name)


def allreduce_sum(values: torch.Tensor, name: str) -> torch.Tensor:
    """Sum a small float64 tensor of statistics over ranks (exact for counts, order-stable for sums)."""
    return hvd.allreduce(values.double().cpu(), op=hvd.Sum, name=name)


def run_on_main(fn: Callable[[], Any], name: str) -> Any:
    """Run `fn` on rank 0 only (a rank-0 side effect); every rank raises the UserError it raised, if any.

    Without this, a rank-0 failure would leave the other ranks waiting in their next collective forever.
    """
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except UserError as err:
            error = str(err)
    error = broadcast_object(error, name=f"{name}.error")
    if error:
        raise UserError(error)
    return result
