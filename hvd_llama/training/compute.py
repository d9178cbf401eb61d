"""What a step computes, shared by training, evaluation and the benchmarks: precision contexts, the next-token
loss, one training step, and the one scoring function behind training's validation and `evaluate`."""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from hvd_llama.procs import OneProcess
from hvd_llama.training.data import IGNORE_INDEX, inputs_and_targets
from hvd_llama.training.optim import LossScaler

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token loss of every position, in fp32; 0 where the target is masked out (-100)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none")


def model_token_losses(model, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device, precision: str,
                       chunk: int = 0) -> torch.Tensor:
    """token_losses(model(inputs), targets) under `precision`, computed `chunk` tokens at a time when the batch
    holds more (0 = never chunk). `model`: a Transformer (its hidden() and output).

    Full-vocabulary logits are the largest tensors of a step (16 x 4096 tokens x 32000 in fp32 is 8 GB, and
    the loss keeps more than two such copies for backward). Chunked, the output head projects `chunk` rows of
    the final hidden states at a time, and in training each chunk's projection and loss run under activation
    checkpointing, so backward recomputes one chunk's logits at a time instead of keeping them all: the same
    losses, for the output head's forward matmul done twice.
    """
    with autocast(device, precision):
        if chunk <= 0 or targets.numel() <= chunk:
            return token_losses(model(inputs), targets)
        hidden, targets = model.hidden(inputs).flatten(0, 1), targets.flatten()
    losses = []
    for h, t in zip(hidden.split(chunk), targets.split(chunk)):
        if torch.is_grad_enabled():
            losses.append(checkpoint(_head_losses, model.output, h, t, device, precision, use_reentrant=False))
        else:
            losses.append(_head_losses(model.output, h, t, device, precision))
    return torch.cat(losses)


def _head_losses(head, hidden: torch.Tensor, targets: torch.Tensor, device: torch.device,
                 precision: str) -> torch.Tensor:
    # Autocast's cache would share one low-precision copy of the head's weight among the chunks, and their
    # weight gradients would be summed in bf16/fp16; cast afresh, each returns to fp32 before the sum.
    with autocast(device, precision, cache=False):
        return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


def count_targets(targets: torch.Tensor) -> int:
    return int((targets != IGNORE_INDEX).sum())


def autocast(device: torch.device, precision: str, cache: bool = True):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision], cache_enabled=cache)


def spread_selection(n_items: int, n_selected: int, seed: int) -> list[int]:
    """`n_selected` item indices spread evenly over [0, n_items): one per equal stratum, at a seeded offset.

    Validation during training scores these instead of the first items, which would all fall in one document.
    The same seed gives the same selection at every step and on every rank; 0 or more than n_items = all items.
    """
    if n_selected <= 0 or n_selected >= n_items:
        return list(range(n_items))
    bounds = np.linspace(0, n_items, n_selected + 1)
    rng = np.random.default_rng(seed)
    return [int(lo + rng.random() * (hi - lo)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def item_batches(dataset, indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive runs of at most batch_size indices whose items have one shape (a partial window: alone)."""
    batches, shape = [], None
    for index in indices:
        item_shape = dataset.item_shape(index)
        if not batches or len(batches[-1]) == batch_size or item_shape != shape:
            batches.append([])
        batches[-1].append(index)
        shape = item_shape
    return batches


@torch.no_grad()
def score(model, dataset, indices: Sequence[int], batch_size: int, device: torch.device, precision: str,
          byte_lengths: Optional[np.ndarray] = None, ranks=OneProcess, progress: bool = False,
          loss_chunk: int = 0) -> dict:
    """Total loss (nats), scored targets and their UTF-8 bytes over `dataset[indices]`, summed over all ranks.

    The one scoring function of training's validation and `evaluate`. Batches go to the `ranks` (hvd_llama.parallel,
    or procs.OneProcess) by stride and do not depend on the world size, and the sums travel in float64, so any number
    of ranks gives the figures of one process. `byte_lengths[token]` (optional) counts the bytes each target token stands for;
    `progress` shows a bar (rank 0 of `evaluate` on a terminal); `loss_chunk`: see model_token_losses.
    """
    was_training = model.training
    model.eval()
    batches = item_batches(dataset, indices, batch_size)
    loss_sum, n_targets, n_bytes = 0.0, 0, 0
    mine = batches[ranks.rank()::ranks.size()]
    for batch in tqdm(mine, desc="score", unit="batch", disable=not progress, file=sys.stderr, leave=False):
        inputs, targets = inputs_and_targets(torch.stack([dataset[i] for i in batch]))
        losses = model_token_losses(model, inputs.to(device), targets.to(device), device, precision, loss_chunk)
        loss_sum += losses.double().sum().item()
        n_targets += count_targets(targets)
        if byte_lengths is not None:
            n_bytes += int(byte_lengths[targets[targets != IGNORE_INDEX].numpy()].sum())
    model.train(was_training)
    sums = ranks.allreduce_sum(torch.tensor([loss_sum, n_targets, n_bytes], dtype=torch.float64),
                               name="score.sums").tolist()
    return {"loss_sum": sums[0], "tokens": int(sums[1]), "bytes": int(sums[2]), "items": len(indices)}


@dataclass
class StepResult:
    loss_sum: float  # this rank's summed token losses (nats)
    n_targets: int  # the step's targets over all ranks and micro-batches
    grad_norm: float  # global norm of the averaged gradients, before clipping
    stepped: bool  # False: skipped on every rank (non-finite gradients, e.g. an fp16 loss-scale overflow)


def train_step(model, optimizer, micro_batches, device, precision: str, grad_clip: float,
               scaler: Optional[LossScaler] = None, poison: bool = False, ranks=OneProcess,
               loss_chunk: int = 0) -> StepResult:
    """One optimizer step over `grad_accum` micro-batches with a data-parallel optimizer (hvd_llama.parallel's, any
    ZeRO stage, with `ranks` = hvd_llama.parallel; or a plain one with procs.OneProcess).

    The step's loss is the sum of its token losses over the global number of targets (all ranks, all
    micro-batches; the count is allreduced before backward), so however the batch is split across ranks and
    micro-steps the gradient is the same: fine-tuning rows have different numbers of targets, and a mean of
    per-micro-batch means would weight short responses' tokens more. The optimizer averages gradients over
    ranks, hence the factor size() / count. The global norm is the same on every rank, so a non-finite norm
    makes every rank skip the same step together. `poison` turns this rank's loss into NaN (fault injection);
    `loss_chunk`: see model_token_losses.
    """
    batches = [inputs_and_targets(batch.to(device, non_blocking=True)) for batch in micro_batches]
    local_targets = sum(count_targets(targets) for _, targets in batches)
    n_targets = int(ranks.allreduce_sum(torch.tensor([local_targets]), name="step.targets").item())
    loss_scale = scaler.scale if scaler else 1.0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for inputs, targets in batches:
        loss = model_token_losses(model, inputs, targets, device, precision, loss_chunk).sum()
        if poison:
            loss = loss * float("nan")
        (loss * (loss_scale * ranks.size() / max(n_targets, 1))).backward()
        loss_sum += loss.detach()
    optimizer.reduce_gradients()
    if scaler:
        optimizer.scale_gradients(1.0 / loss_scale)
    grad_norm = optimizer.clip_grad_norm_(grad_clip)
    stepped = bool(torch.isfinite(grad_norm))
    if stepped:
        optimizer.step()
    optimizer.zero_grad()
    if scaler:
        scaler.update(overflow=not stepped)
    return StepResult(loss_sum.item(), n_targets, float(grad_norm), stepped)
