"""Run alone or under a launcher: two training steps of a model built from config values (random tokens), then
print this rank's peak resident memory and model state (bytes) as JSON.

    python tests/support/memory_step.py section.key=value ...

The second step is the steady state the planner describes: AdamW's state already exists from the first, and the
peak printed is the second step's own (measure_from_here).
"""
import ctypes
import json
import sys

import torch

from hvd_llama import parallel
from hvd_llama.config import load_config
from hvd_llama.procs import peak_rss
from hvd_llama.training.builder import build_training
from hvd_llama.training.compute import train_step


def measure_from_here() -> None:
    """From here VmHWM is what follows: glibc hands back the free pages the first step left in its heaps
    (malloc_trim) and Linux resets the high-water mark (clear_refs 5). How much the first step left depends on how
    the ranks' timings interleaved its frees: at stage 3 on a loaded 2-core machine the second step's peak ranged
    over 1.01-1.17 of the plan with those pages kept, 0.97-1.07 without."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    cfg = load_config(None, sys.argv[1:])
    t = cfg.train
    device = parallel.init(cfg.dist, "cpu")
    built = build_training(cfg, device)  # as training builds it: bf16 weights with bf16 and a sharded optimizer
    model, optimizer = built.model, built.optimizer
    for step in range(2):
        if step == 1:
            measure_from_here()
        batches = [torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1)) for _ in range(t.grad_accum)]
        train_step(model, optimizer, batches, device, t.precision, cfg.optim.grad_clip, ranks=parallel)
    model_state = sum(optimizer.state_bytes().values())  # after a step: weights, gradients, AdamW on this rank
    print(json.dumps({"rank": parallel.rank(), "peak_rss": peak_rss(), "model_state": model_state}), flush=True)


if __name__ == "__main__":
    main()
