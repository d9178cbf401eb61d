"""Run under a launcher (or alone): train a small model with the data-parallel optimizers and print results.

    python tests/support/zero_job.py MODE [DIR]

MODE: equivalence | reshard-save DIR | reshard-load DIR | bf16 | accum | single. Each rank prints `RESULT <json>`
lines that tests/test_zero.py checks. The model is a Transformer with odd sizes plus an output bias of vocabulary size
(37), so the trainable parameter count is not a multiple of 2 or 3 and buckets need padding. Every micro-step
draws one global batch of GLOBAL_BATCH sequences and rank r of N trains on its r-th N-th, so runs at different
world sizes see the same data and ranks see different data.
"""
import copy
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hvd_llama import parallel
from hvd_llama.config import DistConfig
from hvd_llama.lora import apply_lora
from hvd_llama.model import ModelConfig, Transformer
from hvd_llama.parallel.zero import allgather_tensor
from hvd_llama.training.optim import param_groups
from hvd_llama.training.zero_layout import merge_slices

VOCAB, SEQ, GLOBAL_BATCH, GRAD_ACCUM, MAX_NORM, LR = 37, 8, 6, 2, 0.05, 1e-2
MODEL = ModelConfig(dim=24, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=VOCAB, multiple_of=8, max_seq_len=16)
SMALL_BUCKETS = 1000  # elements: many buckets, several with padding
POISON_STEP = 2  # equivalence: the last rank's gradients are NaN at this step; every rank must skip it
ACCUM = 4  # accum: micro-steps summed into one step with bf16 weights


class BiasedTransformer(nn.Module):
    """The Transformer plus a bias on the logits: an odd-sized parameter (every Transformer tensor is even)."""

    def __init__(self):
        super().__init__()
        self.transformer = Transformer(MODEL)
        self.bias = nn.Parameter(torch.linspace(-0.1, 0.1, VOCAB))

    def forward(self, tokens):
        return self.transformer(tokens) + self.bias


def build_model(lora: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = BiasedTransformer()
    if lora:
        apply_lora(model, rank=3, alpha=6.0)
        torch.nn.init.normal_(model.transformer.layers[0].attention.wq.lora_B, std=0.02)  # else B@A starts at 0
        model.bias.requires_grad_(True)
    return model


def build_optimizer(model, stage, bucket_elements=SMALL_BUCKETS, compression="none", predivide=1.0,
                    grad_accum=GRAD_ACCUM):
    groups = param_groups(model, weight_decay=0.1)
    cfg = DistConfig(compression=compression, gradient_predivide_factor=predivide)
    return parallel.build_data_parallel_optimizer(model, groups, dict(lr=LR, betas=(0.9, 0.95), eps=1e-8), cfg,
                                              stage, grad_accum, bucket_elements=bucket_elements)


def micro_batch(step: int, micro: int) -> torch.Tensor:
    """This rank's rows of the global batch of (step, micro): learnable (token i+1 = 5 * token i + 3 mod VOCAB
    from a random start, with one random token per row), so losses fall and runs that differ diverge."""
    generator = torch.Generator().manual_seed(1000 * step + micro)
    batch = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=generator).repeat(1, SEQ + 1)
    for i in range(1, SEQ + 1):
        batch[:, i] = (5 * batch[:, i - 1] + 3) % VOCAB
    noise = torch.randint(0, SEQ + 1, (GLOBAL_BATCH,), generator=generator)
    batch[torch.arange(GLOBAL_BATCH), noise] = torch.randint(0, VOCAB, (GLOBAL_BATCH,), generator=generator)
    share = GLOBAL_BATCH // parallel.size()
    return batch[parallel.rank() * share:(parallel.rank() + 1) * share]


def next_token_loss(model, batch: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(batch[:, :-1]).float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def lr_at(step: int) -> float:
    return LR * (1 + step % 5) / 5  # changes every step: param_groups' lr must reach the sharded AdamW


def train_step(model, opt, step: int, poison: bool = False) -> dict:
    """One optimizer step as train.py takes it; `poison` makes the last rank's gradients NaN."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step)
    losses = []
    for micro in range(GRAD_ACCUM):
        loss = next_token_loss(model, micro_batch(step, micro))
        losses.append(loss.item())
        if poison and parallel.rank() == parallel.size() - 1:
            loss = loss * float("nan")
        (loss / GRAD_ACCUM).backward()
    opt.reduce_gradients()
    grads_left = sum(p.grad is not None for p in model.parameters())
    norm = opt.clip_grad_norm_(MAX_NORM)
    if torch.isfinite(norm):
        opt.step()
    opt.zero_grad()
    mean_loss = parallel.allreduce_sum(torch.tensor([sum(losses) / len(losses)]), name="loss").item() / parallel.size()
    return {"loss": mean_loss, "norm": norm.item(), "grads_left": grads_left, "digest": digest(model)}


def digest(model) -> str:
    return hashlib.sha256(b"".join(p.detach().view(torch.int16 if p.dtype == torch.bfloat16 else p.dtype)
                                   .numpy().tobytes() for p in model.parameters())).hexdigest()


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def emit(**values) -> None:
    # one write per line: mpirun --tag-output tags every chunk it reads, even a lone newline
    sys.stdout.write(f"RESULT {json.dumps(values)}\n")
    sys.stdout.flush()


def run(stage: int, steps: range, model=None, opt=None, lora=False, poison_step=None, **options):
    model = model or build_model(lora)
    opt = opt or build_optimizer(model, stage, **options)
    records = [train_step(model, opt, step, poison=step == poison_step) for step in steps]
    return model, opt, records


def diffs(a: nn.Module, b: nn.Module) -> torch.Tensor:
    """|a - b| of every parameter element, flattened into one tensor."""
    return torch.cat([(x.detach().float() - y.detach().float()).abs().reshape(-1)
                      for x, y in zip(a.parameters(), b.parameters())])


EQUIVALENCE = {  # name: (the stage-0 run it must match, stage, options)
    "s0": ("s0", 0, {}), "s1": ("s0", 1, {}), "s2": ("s0", 2, {}),
    "s1_one_bucket": ("s0", 1, {"bucket_elements": 10**9}), "s2_one_bucket": ("s0", 2, {"bucket_elements": 10**9}),
    "fp16_s0": ("fp16_s0", 0, {"compression": "fp16", "predivide": 2.0}),
    "fp16_s2": ("fp16_s0", 2, {"compression": "fp16", "predivide": 2.0}),
    "lora_s0": ("lora_s0", 0, {"lora": True}), "lora_s2": ("lora_s0", 2, {"lora": True, "bucket_elements": 10**9}),
}


def equivalence() -> None:
    """Stages 1/2 against stage 0 (small buckets, one bucket, fp16 compression with predivision, LoRA):
    losses, parameters, moments, state sizes, and a NaN on one rank skipping a step on all."""
    finished = {}
    for name, (reference, stage, options) in EQUIVALENCE.items():
        model, opt, records = run(stage, range(5), poison_step=POISON_STEP, **options)
        finished[name] = model, opt
        ref_model, ref_opt = finished[reference]
        lora = options.get("lora", False)
        param_diffs = diffs(model, ref_model)
        result = {"name": name, "stage": stage, "lora": lora, "records": records,
                  "param_diff": param_diffs.max().item(), "param_mean_diff": param_diffs.mean().item(),
                  "P": trainable_count(model), "world": parallel.size(),
                  "tensors": sum(p.requires_grad for p in model.parameters()),
                  "bytes": opt.state_bytes()}
        # Gradient bytes during accumulation (the fp32 buffers of stages 1-2, whole) and right after
        # reduce_gradients; stage 2 launches nothing on the first micro-step and every bucket during the last
        # one's backward.
        batch, launched = micro_batch(99, 0), []
        for micro in range(GRAD_ACCUM):
            next_token_loss(model, batch).backward()
            launched.append(getattr(opt, "launched", None))
            if micro == 0:
                result["bytes_accumulating"] = opt.state_bytes()
        result["launched_in_backward"] = launched
        opt.reduce_gradients()
        result["bytes_after_reduce"] = opt.state_bytes()
        opt.zero_grad()
        if stage:
            result["shard_numel"] = {k: getattr(opt, k).numel() for k in ("grad_shard", "exp_avg", "exp_avg_sq")}
            result["buckets"] = len(opt.layout.buckets)
            slices = parallel.allgather_object(opt.state_dict(), name=f"slices.{name}")
            result["ranges"] = [s["ranges"] for s in slices]
            result["moment_diff"] = moment_diff(merge_slices(slices), ref_model, ref_opt)
        emit(**result)


def moment_diff(merged: dict, ref_model, ref_opt) -> float:
    """Largest difference between merged slices and stage 0's AdamW moments (and step count)."""
    names = {id(p): n for n, p in ref_model.named_parameters()}
    diffs = []
    for p, state in ref_opt.optimizer.state.items():
        mine = merged["state"][names[id(p)]]
        assert int(state["step"].item()) == merged["step"], (state["step"], merged["step"])
        diffs += [(mine[k] - state[k]).abs().max().item() / max(state[k].abs().max().item(), 1e-30)
                  for k in ("exp_avg", "exp_avg_sq")]
    return max(diffs)


def save(model, opt, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(opt.state_dict(), directory / f"slice{parallel.rank()}.pt")
    if parallel.is_main():
        torch.save(model.state_dict(), directory / "model.pt")
    parallel.allreduce_sum(torch.zeros(1), name="saved")  # every file written before anyone reads


def resumed(stage: int, directory: Path, load_optimizer: bool = True):
    """A model and optimizer from the saved weights and all ranks' slices (at whatever world size saved them)."""
    model = build_model()
    model.load_state_dict(torch.load(directory / "model.pt"))
    opt = build_optimizer(model, stage)
    if load_optimizer:
        opt.load_state_dict([torch.load(f) for f in sorted(directory.glob("slice*.pt"))])
    return model, opt


def reshard_save(directory: Path) -> None:
    """10 straight steps per stage, the state after step 5 saved (every rank's slice plus the weights); and
    steps 6-10 again from that state at this world size."""
    for stage in (1, 2):
        model, opt, first = run(stage, range(5))
        save(model, opt, directory / f"stage{stage}")
        _, _, rest = run(stage, range(5, 10), model, opt)
        again_model, again_opt = resumed(stage, directory / f"stage{stage}")
        _, _, again = run(stage, range(5, 10), again_model, again_opt)
        emit(stage=stage, losses=[r["loss"] for r in first + rest], resumed=[r["loss"] for r in again],
             digests=[digest(model), digest(again_model)], world=parallel.size())


def reshard_load(directory: Path) -> None:
    """Steps 6-10 from the saved weights and all saved slices at this world size; and, as a control, from the
    weights alone with a fresh optimizer."""
    for stage in (1, 2):
        _, _, rest = run(stage, range(5, 10), *resumed(stage, directory / f"stage{stage}"))
        _, _, fresh = run(stage, range(5, 10), *resumed(stage, directory / f"stage{stage}", load_optimizer=False))
        emit(stage=stage, losses=[r["loss"] for r in rest], fresh=[r["loss"] for r in fresh], world=parallel.size())


def bf16() -> None:
    """fp32 training against bf16 weights with fp32 master slices, 20 steps; the bf16 allgather bit for bit."""
    special = torch.tensor([0.0, -0.0, 1e-40, -3.5, float("inf"), float("nan"), 65504.0, 1e38 * (parallel.rank() + 1)])
    own = (special * (parallel.rank() + 1)).to(torch.bfloat16)
    gathered = allgather_tensor(own, name="bf16.check")
    emit(kind="allgather", own=own.view(torch.int16).tolist(), gathered=gathered.view(torch.int16).tolist(),
         dtype=str(gathered.dtype))
    for stage in (1, 2):
        _, _, fp32 = run(stage, range(20))
        model = build_model().to(torch.bfloat16)
        _, opt, low = run(stage, range(20), model, build_optimizer(model, stage))
        views_match = all(torch.equal(v.view(torch.int16), t.to(torch.bfloat16).view(torch.int16))
                          for v, t in zip(opt._param_views, opt._targets))
        emit(kind="train", stage=stage, fp32=[r["loss"] for r in fp32], bf16=[r["loss"] for r in low],
             digest=digest(model), master_dtype=str(opt.master.dtype), grad_dtype=str(opt.grad_shard.dtype),
             own_slice_is_master=views_match,
             bytes=opt.state_bytes(), shard=opt.exp_avg.numel(), buckets=len(opt.layout.buckets),
             P=trainable_count(model),
             has_master="master" in opt.state_dict())


def accum() -> None:
    """bf16 weights, ACCUM micro-steps, one step per stage: the averaged gradient slice against the fp32 sum of
    the micro-steps' bf16 gradients (each taken alone, from a copy of the model), averaged over the ranks and
    rounded to bf16 once; and the gradient bytes at their peak, before the last backward pass."""
    for stage in (1, 2):
        model = build_model().to(torch.bfloat16)
        alone = copy.deepcopy(model)
        opt = build_optimizer(model, stage, grad_accum=ACCUM)
        local = torch.zeros(trainable_count(model))  # this rank's micro-step gradients, summed in fp32
        for micro in range(ACCUM):
            batch = micro_batch(0, micro)
            grads = torch.autograd.grad(next_token_loss(alone, batch) / ACCUM, list(alone.parameters()))
            local += torch.cat([g.float().reshape(-1) for g in grads])
            peak = opt.state_bytes()  # after the last pass but one: the accumulation buffers are all there
            (next_token_loss(model, batch) / ACCUM).backward()
        opt.reduce_gradients()
        exact = sum(parallel.allgather_object(local, name=f"accum.{stage}")) / parallel.size()
        pieces = opt.layout.pieces
        expected = torch.cat([exact[pc.global_start:pc.global_start + pc.numel] for pc in pieces])
        got = torch.cat([opt.grad_shard[pc.shard_offset:pc.shard_offset + pc.numel] for pc in pieces]).float()
        emit(stage=stage, grad_dtype=str(opt.grad_shard.dtype), elements=got.numel(),
             differing=(got != expected.to(torch.bfloat16).float()).sum().item(),
             relative_error=((got - expected).norm() / expected.norm()).item(), peak=peak,
             numels=[p.numel() for p in model.parameters()], after_reduce=opt.state_bytes())


def single() -> None:
    """One process: stages 1 and 2 against a plain torch.optim.AdamW loop with clip_grad_norm_."""
    torch_model = build_model()
    torch_opt = torch.optim.AdamW(param_groups(torch_model, 0.1), lr=LR, betas=(0.9, 0.95), eps=1e-8)
    plain = []
    for step in range(5):
        for group in torch_opt.param_groups:
            group["lr"] = lr_at(step)
        losses = []
        for micro in range(GRAD_ACCUM):
            batch = micro_batch(step, micro)
            loss = F.cross_entropy(torch_model(batch[:, :-1]).reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
            (loss / GRAD_ACCUM).backward()
            losses.append(loss.item())
        norm = torch.nn.utils.clip_grad_norm_(torch_model.parameters(), MAX_NORM)
        torch_opt.step()
        torch_opt.zero_grad()
        plain.append({"loss": sum(losses) / len(losses), "norm": norm.item()})
    emit(kind="torch", records=plain)
    for stage in (1, 2):
        model, opt, records = run(stage, range(5))
        emit(kind="zero", stage=stage, records=records, param_diff=diffs(model, torch_model).max().item(),
             ranges=opt.state_dict()["ranges"], P=trainable_count(model), shard=opt.exp_avg.numel())


def main() -> None:
    mode = sys.argv[1]
    parallel.init(DistConfig(threads_per_rank=1), "cpu")
    assert trainable_count(build_model()) % 2 and trainable_count(build_model()) % 3, "P must be odd-sized"
    assert trainable_count(build_model(lora=True)) % 2 and trainable_count(build_model(lora=True)) % 3
    {"equivalence": equivalence, "bf16": bf16, "accum": accum, "single": single,
     "reshard-save": lambda: reshard_save(Path(sys.argv[2])),
     "reshard-load": lambda: reshard_load(Path(sys.argv[2]))}[mode]()


if __name__ == "__main__":
    main()
