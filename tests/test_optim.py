import pytest
import torch

from hvd_llama.config import OptimConfig
from hvd_llama.model import ModelConfig, Transformer
from hvd_llama.training.optim import build_optimizer, lr_at


def test_schedule_warmup_peak_cosine_floor():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    warmup = [lr_at(s, cfg, 110) for s in range(10)]
    assert warmup == sorted(warmup) and warmup[0] == pytest.approx(1 / 11) and warmup[-1] < 1.0
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)  # peak right after warmup
    assert lr_at(60, cfg, 110) == pytest.approx(0.1 + 0.5 * 0.9)  # half way through the cosine
    assert lr_at(110, cfg, 110) == pytest.approx(0.1) and lr_at(500, cfg, 110) == 0.1
    decay = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_weight_decay_only_on_matrices():
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=64, max_seq_len=16))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert isinstance(opt, torch.optim.AdamW)
