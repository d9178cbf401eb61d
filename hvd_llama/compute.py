"""What a step computes, shared by training, evaluation and the benchmarks: precision contexts, the next-token
loss, one training step and the validation loss."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from hvd_llama import dist
from hvd_llama.data import IGNORE_INDEX, inputs_and_targets

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the targets that are not masked out (-100)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


@torch.no_grad()
def evaluate(model, dataset, n_windows: int, batch_size: int, device, precision: str) -> float:
    """Mean loss per target token over the first `n_windows` rows (0 = all), split across ranks by stride.

    Sums travel in float64 and the split does not depend on the number of ranks, so any world size gives
    the same figure.
    """
    model.eval()
    total = len(dataset) if n_windows <= 0 else min(n_windows, len(dataset))
    indices = list(range(dist.rank(), total, dist.size()))
    loss_sum, count = 0.0, 0
    for start in range(0, len(indices), batch_size):
        batch = torch.stack([dataset[i] for i in indices[start:start + batch_size]]).to(device)
        inputs, targets = inputs_and_targets(batch)
        with autocast(device, precision):
            logits = model(inputs)
        loss_sum += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum",
                                    ignore_index=IGNORE_INDEX).item()
        count += (targets != IGNORE_INDEX).sum().item()
    model.train()
    sums = dist.allreduce_sum(torch.tensor([loss_sum, count]), name="eval.sums")
    return (sums[0] / sums[1]).item()


def train_step(model, optimizer, micro_batches, device, precision, grad_clip, scaler=None, poison=False):
    """One optimizer step over `grad_accum` micro-batches; returns (this rank's mean loss, grad norm, stepped).

    Horovod: gradients are allreduced once the last micro-batch's backward is done (backward_passes_per_step).
    The norm is taken on the averaged gradients, identical on every rank, so a non-finite norm makes every
    rank skip the same step together. `poison` turns this rank's loss into NaN (fault injection).
    """
    losses = []
    for batch in micro_batches:
        batch = batch.to(device, non_blocking=True)
        with autocast(device, precision):
            inputs, targets = inputs_and_targets(batch)
            loss = cross_entropy(model(inputs), targets)
        if poison:
            loss = loss * float("nan")
        scaled = loss / len(micro_batches)
        (scaler.scale(scaled) if scaler else scaled).backward()
        losses.append(loss.detach())
    optimizer.synchronize()
    if scaler:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    stepped = bool(torch.isfinite(grad_norm))
    with optimizer.skip_synchronize():
        if scaler:
            scaler.step(optimizer)  # skips by itself on inf/nan and lowers the scale
            scaler.update()
        elif stepped:
            optimizer.step()
    optimizer.zero_grad()
    return torch.stack(losses).mean().item(), grad_norm.item(), stepped
