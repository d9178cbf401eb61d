"""Run under a launcher: ZeRO stage 3 against stage 0 on the same data, in one job.

    python tests/support/zero3_job.py OUT CASE [CASE ...]

CASE: base | tied | lora | sft. For each case both stages are built by the training builder from one config (as
training starts: at stage 0 rank 0 initialises and broadcasts; at stage 3 every rank draws its own slices), then
train STEPS steps of GRAD_ACCUM micro-steps with clipping on the same global batches (rank r of N trains on its
r-th share), and rank 0 writes to OUT a JSON object per case: both stages' losses and norms, the largest difference of their
initial and of their final weights, the stage-3 model state after the steps, and the most weight and gradient
bytes a rank held at once, against the planner's figures. The model has odd sizes (vocabulary 37, width 20: no tensor a multiple of 3).
"""
import json
import sys
from pathlib import Path

import torch

from hvd_llama import parallel
from hvd_llama.config import load_config
from hvd_llama.training.builder import build_training
from hvd_llama.training.compute import train_step
from hvd_llama.training.data import IGNORE_INDEX
from hvd_llama.training.memory import count_params, zero3_sizes, zero3_state_bytes
from hvd_llama.training.optim import set_lr
from hvd_llama.training.zero_layout import SliceIndex

VOCAB, SEQ, GLOBAL_BATCH, GRAD_ACCUM, STEPS, LR, CLIP = 37, 12, 6, 2, 5, 1e-2, 0.5
MODEL = ["model.dim=20", "model.n_layers=3", "model.n_heads=2", "model.n_kv_heads=1", f"model.vocab_size={VOCAB}",
         "model.multiple_of=8", "model.max_seq_len=16", f"train.seq_len={SEQ}", f"train.grad_accum={GRAD_ACCUM}",
         "train.activation_checkpointing=true", "dist.zero3_prefetch=1"]
CASES = {"base": [], "tied": ["model.tie_embeddings=true"],
         "lora": ["finetune.lora_rank=3", "finetune.lora_alpha=6", "finetune.lora_targets=wq,wv,w2",
                  "finetune.init_from=base"],
         "sft": []}


def batches(case: str, step: int) -> list[torch.Tensor]:
    """This rank's micro-batches of step `step`: its share of each global batch. sft: [B, 2, T] rows of
    (inputs, targets) whose prompts and padding (different lengths per row) are masked out of the targets."""
    g = torch.Generator().manual_seed(1000 + step)
    share = GLOBAL_BATCH // parallel.size()
    mine = slice(parallel.rank() * share, (parallel.rank() + 1) * share)
    out = []
    for _ in range(GRAD_ACCUM):
        tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
        if case == "sft":
            targets = tokens[:, 1:].clone()
            for row in range(GLOBAL_BATCH):
                prompt, length = torch.randint(1, 5, (1,), generator=g).item(), torch.randint(6, SEQ + 1, (1,),
                                                                                          generator=g).item()
                targets[row, :prompt] = IGNORE_INDEX
                targets[row, length:] = IGNORE_INDEX
            tokens = torch.stack([tokens[:, :-1], targets], dim=1)
        out.append(tokens[mine])
    return out


def base_weights(cfg) -> dict:
    """LoRA's pretrained base: a model initialised with another seed."""
    torch.manual_seed(99)
    from hvd_llama.model import Transformer
    return Transformer(cfg.model).state_dict()


def stage3_weights(optimizer) -> dict:
    """Every trainable weight of a stage-3 run, assembled from every rank's slice."""
    slices = parallel.allgather_object(optimizer.state_dict(), name="zero3.slices")
    return SliceIndex(slices).parameters(slices[0]["params"], "param")


def largest_difference(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def run(case: str, stage: int, record_peak: bool = False) -> dict:
    cfg = load_config(None, MODEL + CASES[case] + [f"dist.zero_stage={stage}"])
    init = base_weights(cfg) if case == "lora" and (stage == 3 or parallel.is_main()) else None
    built = build_training(cfg, torch.device("cpu"), init, initialise=parallel.is_main())
    model, optimizer = built.model, built.optimizer
    parallel.broadcast_state(model, optimizer, has_optimizer_state=False)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    weights = (lambda: stage3_weights(optimizer)) if stage == 3 else \
        (lambda: {n: p.detach().clone() for n, p in trainable.items()})
    result = {"initial": weights(), "losses": [], "norms": [], "peak": {"weights": 0, "gradients": 0}}
    if record_peak:  # the bytes held right after every gather: slices and the units gathered, gradients
        gather = optimizer.shards.gather

        def recording(unit):
            gather(unit)
            for kind, held in optimizer.state_bytes().items():
                if kind in result["peak"]:
                    result["peak"][kind] = max(result["peak"][kind], held)
        optimizer.shards.gather = recording
    for step in range(STEPS):
        set_lr(optimizer, LR)
        outcome = train_step(model, optimizer, batches(case, step), torch.device("cpu"), "fp32", CLIP, ranks=parallel)
        result["losses"].append(outcome.loss_sum)
        result["norms"].append(outcome.grad_norm)
    optimizer.reduce_gradients()
    result["state_bytes"] = optimizer.state_bytes()
    result["final"] = weights()
    result["counts"] = count_params(cfg), cfg
    return result


def main() -> None:
    parallel.init(load_config(None, MODEL).dist, "cpu")
    results = []
    for case in sys.argv[2:]:
        zero, three = run(case, 0), run(case, 3, record_peak=True)
        losses = [parallel.allreduce_sum(torch.tensor(r["losses"]), name=f"losses.{case}.{i}").tolist()
                  for i, r in enumerate((zero, three))]
        counts, cfg = three["counts"]
        layouts, _ = zero3_sizes(counts, parallel.size())
        slices_t, slices_f = (layout.shard_numel for layout in layouts.layouts)
        planned = zero3_state_bytes(counts, parallel.size(), False, cfg.dist.zero3_prefetch)
        results.append({"case": case, "losses": losses, "norms": [zero["norms"], three["norms"]],
                        "initial_diff": largest_difference(zero["initial"], three["initial"]),
                        "final_diff": largest_difference(zero["final"], three["final"]),
                        "moved": largest_difference(zero["initial"], zero["final"]),
                        "state_bytes": three["state_bytes"], "slices": [slices_t, slices_f],
                        "peak": three["peak"], "planned": planned})
    if parallel.is_main():
        Path(sys.argv[1]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
