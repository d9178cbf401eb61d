"""Horovod Elastic: a training state whose commits live in host memory, the run wrapper, and the start-up of a
worker that joins a running job."""
from __future__ import annotations

import copy
import os

import horovod.torch as hvd
import torch
from horovod.common.elastic import ObjectState

from hvd_llama.parallel import _broadcast, broadcast_object


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


class ElasticState(ObjectState):
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


def training_state(model, optimizer, **values) -> ObjectState:
    """`optimizer`: a stage-0 data-parallel optimizer (elastic needs replicated state: Horovod re-syncs it by
    broadcast from rank 0)."""
    return ElasticState(model, optimizer.optimizer, **values)


run = hvd.elastic.run
JOINING = "elastic.joining"


def joining() -> bool:
    """Horovod Elastic: whether this worker joins a job that is already training (a host added, or back after
    its blacklist cooldown) rather than starting with the others. Horovod runs the whole script on a new
    worker while the others, back from their reset, go straight to the state's sync: a newcomer that made the
    start-up collectives (run dir, pretrained weights, resume) would wait in them forever, and so would the
    others in the sync. Every worker calls this right after init; the workers already training make the same
    collective first in their sync after a reset, where rank 0 (never a newcomer: Horovod ranks the hosts it
    had first) answers True."""
    return broadcast_object(False, name=JOINING)


def leave_job() -> None:
    """End an elastic worker's process now that everything it wrote is flushed: Horovod shuts down, then the
    process exits without Python's finalization. Seen here: workers that horovodrun's elastic driver stopped
    with SIGTERM (a scheduler's signal to the job) checkpointed, printed their summary, and then hung in the
    interpreter's final garbage collection, under load, until the driver SIGKILLed them 5 s later and the
    job reported failure."""
    hvd.shutdown()
    os._exit(0)
