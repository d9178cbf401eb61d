"""AdamW with weight decay on matrices only, and the learning-rate schedule as a pure function."""
from __future__ import annotations

import math
from typing import Protocol

import torch

from hvd_llama.config import OptimConfig


class DataParallelOptimizer(Protocol):
    """What training needs of a data-parallel optimizer, at every ZeRO stage (parallel/zero.py): stage 0 wraps
    hvd.DistributedOptimizer (gradients allreduced during backward), stages 1-2 shard the optimizer state (and
    the gradients) over the ranks. One step, the same code at every stage:

        for batch in micro_batches: loss(batch).backward()
        opt.reduce_gradients(); opt.scale_gradients(1 / loss_scale)   # the latter for fp16 only
        norm = opt.clip_grad_norm_(max_norm)                          # identical on every rank
        if torch.isfinite(norm): opt.step()
        opt.zero_grad()
    """
    stage: int  # the ZeRO stage

    @property
    def param_groups(self) -> list[dict]: ...  # AdamW's groups: set_lr writes each one's "lr"

    def reduce_gradients(self) -> None: ...  # after the last micro-batch's backward: averaged over the ranks

    def scale_gradients(self, factor: float) -> None: ...

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor: ...  # the global norm, before clipping

    def step(self) -> None: ...

    def zero_grad(self) -> None: ...

    def state_dict(self) -> dict: ...  # stage 0: the whole AdamW state; 1-2: this rank's slice

    def load_state_dict(self, state) -> None: ...  # 1-2: every rank's slices of a checkpoint, at any world size

    def state_bytes(self) -> dict: ...  # bytes this rank holds: weights, gradients, optimizer


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (embeddings, projections); leave norms' gains alone, as LLaMA and nanoGPT do."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]


def adamw_kwargs(cfg: OptimConfig) -> dict:
    return dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """A plain (one-process) AdamW; training builds its data-parallel one with hvd_llama.parallel."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **adamw_kwargs(cfg), fused=fused or None)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at max_steps (step counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class LossScaler:
    """Dynamic loss scaling for fp16 (torch.amp.GradScaler's rule and state_dict keys) driven by the global
    gradient norm, so every rank decides alike at every ZeRO stage: GradScaler checks each rank's own
    gradients, which at stages 1 and 2 are slices, and ranks could disagree.

    Scale the loss before backward; unscale the reduced gradients by `1 / scale`; a non-finite global norm means
    an overflow: the step is skipped and the scale halves; `growth_interval` good steps in a row double it.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale, self.growth_factor, self.backoff_factor = init_scale, growth_factor, backoff_factor
        self.growth_interval, self.good_steps = growth_interval, 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.growth_factor = float(state["scale"]), float(state["growth_factor"])
        self.backoff_factor, self.growth_interval = float(state["backoff_factor"]), int(state["growth_interval"])
        self.good_steps = int(state["_growth_tracker"])
