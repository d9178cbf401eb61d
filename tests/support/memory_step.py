"""Run alone or under a launcher: two training steps of a model built from config values (random tokens), then
print this rank's peak resident memory and model state (bytes) as JSON.

    python tests/support/memory_step.py section.key=value ...

The second step is the steady state the planner describes: AdamW's state already exists from the first.
"""
import json
import sys

import torch

from hvd_llama import parallel
from hvd_llama.config import load_config
from hvd_llama.procs import peak_rss
from hvd_llama.training.builder import build_training
from hvd_llama.training.compute import train_step


def main() -> None:
    cfg = load_config(None, sys.argv[1:])
    t = cfg.train
    device = parallel.init(cfg.dist, "cpu")
    built = build_training(cfg, device)  # as training builds it: bf16 weights with bf16 and a sharded optimizer
    model, optimizer = built.model, built.optimizer
    for _ in range(2):
        batches = [torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1)) for _ in range(t.grad_accum)]
        train_step(model, optimizer, batches, device, t.precision, cfg.optim.grad_clip, ranks=parallel)
    model_state = sum(optimizer.state_bytes().values())  # after a step: weights, gradients, AdamW on this rank
    print(json.dumps({"rank": parallel.rank(), "peak_rss": peak_rss(), "model_state": model_state}), flush=True)


if __name__ == "__main__":
    main()
