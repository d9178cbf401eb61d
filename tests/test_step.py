"""compute.train_step with a one-process optimizer of the data-parallel interface: an fp16 loss-scale overflow
skips the step with a finite loss (train's loop, on the allreduced loss, does not count it toward
train.max_bad_steps), a non-finite loss skips it with a non-finite one."""
import math

import torch

from hvd_llama.config import OptimConfig
from hvd_llama.model import ModelConfig, Transformer
from hvd_llama.training.compute import train_step
from hvd_llama.training.optim import LossScaler, build_optimizer


class PlainOptimizer:
    """hvd_llama.parallel's optimizer interface over a plain AdamW (one process: nothing to reduce)."""

    def __init__(self, model):
        self.optimizer, self.params = build_optimizer(model, OptimConfig()), list(model.parameters())
        self.param_groups = self.optimizer.param_groups

    def reduce_gradients(self):
        pass

    def scale_gradients(self, factor):
        for p in self.params:
            p.grad.mul_(factor)

    def clip_grad_norm_(self, max_norm):
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else math.inf)

    def step(self):
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad()


def setup():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=16))
    return model, PlainOptimizer(model), [torch.randint(0, 64, (2, 9))]


def test_an_overflowing_loss_scale_skips_the_step_as_an_overflow():
    model, optimizer, batches = setup()
    before = [p.detach().clone() for p in model.parameters()]
    scaler = LossScaler(init_scale=2.0**127)  # the scaled gradients overflow fp32
    result = train_step(model, optimizer, batches, torch.device("cpu"), "fp32", 1.0, scaler)
    assert not result.stepped and math.isfinite(result.loss_sum)  # an overflow: not a bad step
    assert scaler.scale == 2.0**126  # backed off
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing applied
    result = train_step(model, optimizer, batches, torch.device("cpu"), "fp32", 1.0, LossScaler(init_scale=1024.0))
    assert result.stepped


def test_a_non_finite_loss_is_not_an_overflow():
    model, optimizer, batches = setup()
    result = train_step(model, optimizer, batches, torch.device("cpu"), "fp32", 1.0, LossScaler(), poison=True)
    assert not result.stepped and not math.isfinite(result.loss_sum)  # counts toward train.max_bad_steps


def test_loading_a_checkpoint_keeps_this_optimizers_implementation():
    """A state saved by a non-fused AdamW (a CPU run) loaded into a fused one (a GPU run) keeps `fused`: torch
    would take the file's flags and leave `step` tensors where the fused kernels do not expect them."""
    from hvd_llama.parallel.zero import ReplicatedOptimizer
    model, _, batches = setup()
    saved = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    model(batches[0][:, :-1]).sum().backward()
    saved.step()
    fused = ReplicatedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), model)
    fused.load_state_dict(saved.state_dict())
    group = fused.optimizer.param_groups[0]
    assert group["fused"] is True and group["foreach"] is None
    steps = [s["step"] for s in fused.optimizer.state.values()]
    assert steps and all(s.dtype == torch.float32 and s.device == p.device and float(s) == 1.0
                         for s, p in zip(steps, model.parameters()))
    fused.optimizer.step()  # the fused kernel accepts what was loaded
