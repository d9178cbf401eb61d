"""What a step computes, shared by training and evaluation: precision contexts, the next-token loss, and the one
scoring function behind training's validation and the `evaluate` command."""
from __future__ import annotations

import contextlib
import sys
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hvd_llama import dist
from hvd_llama.data import IGNORE_INDEX, inputs_and_targets

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token loss of every position, in fp32; 0 where the target is masked out (-100)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none")


def count_targets(targets: torch.Tensor) -> int:
    return int((targets != IGNORE_INDEX).sum())


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


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
          byte_lengths: Optional[np.ndarray] = None, progress: bool = False) -> dict:
    """Total loss (nats), scored targets and their UTF-8 bytes over `dataset[indices]`, summed over all ranks.

    The one scoring function of training's validation and `evaluate`. Batches go to the ranks by stride and
    do not depend on the world size, and the sums travel in float64, so any number of ranks gives the figures
    of one process. `byte_lengths[token]` (optional) counts the bytes each target token stands for;
    `progress` shows a bar (rank 0 of `evaluate` on a terminal).
    """
    was_training = model.training
    model.eval()
    batches = item_batches(dataset, indices, batch_size)
    loss_sum, n_targets, n_bytes = 0.0, 0, 0
    mine = batches[dist.rank()::dist.size()]
    for batch in tqdm(mine, desc="score", unit="batch", disable=not progress, file=sys.stderr, leave=False):
        inputs, targets = inputs_and_targets(torch.stack([dataset[i] for i in batch]))
        with autocast(device, precision):
            logits = model(inputs.to(device))
        loss_sum += token_losses(logits, targets.to(device)).double().sum().item()
        n_targets += count_targets(targets)
        if byte_lengths is not None:
            n_bytes += int(byte_lengths[targets[targets != IGNORE_INDEX].numpy()].sum())
    model.train(was_training)
    sums = dist.allreduce_sum(torch.tensor([loss_sum, n_targets, n_bytes], dtype=torch.float64),
                              name="score.sums").tolist()
    return {"loss_sum": sums[0], "tokens": int(sums[1]), "bytes": int(sums[2]), "items": len(indices)}
