"""Run alone or under a launcher: two training steps of a model built from config values (random tokens), then
print this rank's peak resident memory as JSON.

    python tests/memory_step.py section.key=value ...

The second step is the steady state the planner describes: AdamW's state already exists from the first.
"""
import json
import sys

import torch

from hvd_llama import parallel
from hvd_llama.config import load_config
from hvd_llama.model import Transformer
from hvd_llama.training.compute import train_step
from hvd_llama.training.optim import adamw_kwargs, param_groups


def peak_rss() -> int:
    """VmHWM: the most resident memory this process has had, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def main() -> None:
    cfg = load_config(None, sys.argv[1:])
    t = cfg.train
    device = parallel.init(cfg.dist, "cpu")
    torch.manual_seed(t.seed)
    model = Transformer(cfg.model)
    model.set_activation_checkpointing(t.activation_checkpointing)
    if t.precision == "bf16" and cfg.dist.zero_stage >= 1:  # as training builds it: bf16 weights, fp32 master slices
        model.to(torch.bfloat16)
    optimizer = parallel.build_data_parallel_optimizer(model, param_groups(model, cfg.optim.weight_decay),
                                                   adamw_kwargs(cfg.optim), cfg.dist, stage=cfg.dist.zero_stage,
                                                   grad_accum=t.grad_accum)
    for _ in range(2):
        batches = [torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1)) for _ in range(t.grad_accum)]
        train_step(model, optimizer, batches, device, t.precision, cfg.optim.grad_clip, ranks=parallel)
    print(json.dumps({"rank": parallel.rank(), "peak_rss": peak_rss()}), flush=True)


if __name__ == "__main__":
    main()
