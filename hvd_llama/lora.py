"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), as PEFT implements it.

A frozen linear layer W gets a trainable low-rank update: y = x W^T + (alpha / r) * dropout(x) A^T B^T with
A [r, in] initialised like nn.Linear (kaiming_uniform_, a=sqrt(5)) and B [out, r] zeros, so training starts
from exactly the base model. The base weight keeps its name, so a base checkpoint loads into an adapted
model unchanged; the adapters are the only extra state (lora_A / lora_B keys), and merged_state_dict folds
them into W for a plain Transformer checkpoint.

    names = apply_lora(model, rank=8, alpha=16)      # adapts wq, wv of every layer, freezes everything else
    optimizer = AdamW(p for p in model.parameters() if p.requires_grad)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hvd_llama.config import FinetuneConfig, check_lora_targets, split_targets
from hvd_llama.model import init_fp32_

DEFAULT_TARGETS = ("wq", "wv")  # the paper's choice, and PEFT's default for LLaMA
LORA_PARAMS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """nn.Linear with a frozen `weight` (and bias) plus a trainable low-rank update scale * B @ A."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._add_adapter(rank, alpha, dropout)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> "LoRALinear":
        """Turn `linear` itself into a LoRALinear (its class is swapped): the weight tensor is kept, not copied,
        and every module that refers to `linear` now runs the adapted layer."""
        if isinstance(linear, LoRALinear):
            raise ValueError("this layer already has a LoRA adapter")
        check_hyperparameters(rank, alpha, dropout)  # before the swap, so a bad value leaves `linear` as it was
        linear.__class__ = cls
        linear._add_adapter(rank, alpha, dropout)
        return linear

    def _add_adapter(self, rank: int, alpha: float, dropout: float) -> None:
        check_hyperparameters(rank, alpha, dropout)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        like = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **like))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        init_adapter_("lora_A", self.lora_A)
        init_adapter_("lora_B", self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, the update in the shape of `weight`."""
        return self.scale * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def check_hyperparameters(rank: int, alpha: float, dropout: float) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


@torch.no_grad()
def init_adapter_(name: str, value: torch.Tensor) -> None:
    """Initialise `value`, an adapter tensor (the parameter, or a copy of its shape) named `name`: lora_A as
    nn.Linear initialises its weight, from the default generator, lora_B zeros."""
    if name.endswith("lora_A"):
        init_fp32_(value, nn.init.kaiming_uniform_, a=math.sqrt(5))
    else:
        nn.init.zeros_(value)


def is_lora_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in LORA_PARAMS


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Adapt every nn.Linear whose name ends in one of `targets` in place, freeze all other parameters
    (requires_grad=False), and return the adapted module names, e.g. "layers.0.attention.wq"."""
    targets = check_lora_targets(targets)
    check_hyperparameters(rank, alpha, dropout)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters")
    if "output" in targets and getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        raise ValueError("cannot adapt 'output' of a model with tie_embeddings: its matrix is the token-embedding "
                         "table, which a merged update would change too")
    chosen = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not chosen:
        raise ValueError(f"the model has no linear layer named {', '.join(targets)}")
    for _, linear in chosen:
        LoRALinear.from_linear(linear, rank, alpha, dropout)
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_name(name))
    return [name for name, _ in chosen]


def apply_finetune_lora(model: nn.Module, cfg: FinetuneConfig) -> list[str]:
    """apply_lora as the config's finetune section asks for it (nothing when finetune.lora_rank is 0)."""
    if not cfg.lora_rank:
        return []
    return apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, split_targets(cfg.lora_targets))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' lora_A / lora_B tensors (references, like state_dict())."""
    return {k: v for k, v in model.state_dict().items() if is_lora_name(k)}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors saved by lora_state_dict into a model adapted the same way (apply_lora first)."""
    own = lora_state_dict(model)
    if not own:
        raise ValueError("the model has no LoRA adapters; call apply_lora with the same rank and targets first")
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"LoRA state does not match the model's adapters: {_some(missing)} missing, "
                         f"{_some(unexpected)} unexpected; were the same targets adapted?")
    for key, tensor in own.items():
        if tensor.shape != state[key].shape:
            raise ValueError(f"LoRA tensor {key} has shape {tuple(state[key].shape)}, the model's has "
                             f"{tuple(tensor.shape)}; was the same rank used?")
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state[key])


def _some(keys: list[str]) -> str:
    return f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})" if keys else "0"


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter folded in (W + scale * B @ A) and no lora keys: it loads
    into a model without LoRA with strict=True. The adapted model itself is not changed."""
    state = {k: v for k, v in model.state_dict().items() if not is_lora_name(k)}
    for name, module in lora_modules(model).items():
        state[f"{name}.weight"] = (module.weight + module.delta_weight()).to(module.weight.dtype)
    return state


def trainable_param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
