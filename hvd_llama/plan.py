"""Memory planner: bytes per rank of a training run, whether it fits a device, and the largest micro-batch that does.

    python -m hvd_llama.plan --config configs/llama2-7b.yaml --world-size 8 --device-memory 80GiB \\
        --set dist.zero_stage=2 --set train.activation_checkpointing=true

Model state (weights, gradients, AdamW state) is exact tensor arithmetic for each ZeRO stage (model_state_bytes).
Activations are the tensors autograd saves in this model's forward (model.py, compute.py's loss), counted
tensor by tensor for fp32, for bf16/fp16 autocast over fp32 weights and for bf16 weights (activation_bytes), plus
the loss's gradients at the start of backward. The total is the sum of every line: tests/test_plan.py checks the
parts against the tensors PyTorch holds and the total against the peak RSS of real training steps.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence

import torch

from hvd_llama.cli import UserError, run_main
from hvd_llama.config import Config, load_config, split_targets
from hvd_llama.lora import apply_lora
from hvd_llama.model import ModelConfig, Transformer

GiB = 1 << 30
BUCKET_ELEMENTS = 25_000_000  # dist/zero.py's default bucket: the flat buffer is padded per bucket
FUSION_BUFFER = 128 << 20  # Horovod's HOROVOD_FUSION_THRESHOLD default: the stage-0 allreduce staging buffer
# On a GPU, memory torch never sees as tensors: the CUDA context and kernel images (~0.5-1 GiB on A100/H100),
# cuBLAS workspaces and NCCL's communicator buffers (a few hundred MiB); plus 5% of the tensors for the caching
# allocator's fragmentation (blocks reserved but not allocated).
CUDA_FIXED, CUDA_FRAGMENTATION = 2 * GiB, 0.05
# On a CPU: the resident size of the process before any tensor (Python, PyTorch, Horovod initialised, the
# training modules imported: 345 MiB measured), and 5% for glibc's heap fragmentation.
CPU_FIXED, CPU_FRAGMENTATION = 350 << 20, 0.05


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter, a tied matrix counted once
    trainable: int  # requires_grad: all of them, or LoRA's adapters only
    tensors: int  # trainable parameter tensors (torch's AdamW keeps a 4-byte step counter for each)
    matmul: int  # weights that enter matmuls (autocast casts them to half precision in every forward)


def count_params(cfg: Config) -> ParamCounts:
    """Counted on the meta device from the real modules (LoRA applied as train applies it): no memory used."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
        f = cfg.finetune
        if f.lora_rank:
            apply_lora(model, f.lora_rank, f.lora_alpha, f.lora_dropout, split_targets(f.lora_targets))
    params = dict(model.named_parameters())  # named_parameters yields a tied matrix once
    trainable = [p for p in params.values() if p.requires_grad]
    embedding = model.tok_embeddings.weight
    matmul = sum(p.numel() for p in params.values() if p.ndim == 2 and (p is not embedding or cfg.model.tie_embeddings))
    return ParamCounts(total=sum(p.numel() for p in params.values()), trainable=sum(p.numel() for p in trainable),
                       tensors=len(trainable), matmul=matmul)


def shard_elements(n: int, world_size: int, bucket: int = BUCKET_ELEMENTS) -> int:
    """This rank's slice of a flat buffer of n elements cut into buckets, each padded to a multiple of
    world_size: ceil(n / N) plus less than one element per bucket."""
    full, rest = divmod(n, bucket)
    return full * math.ceil(bucket / world_size) + math.ceil(rest / world_size)


def half_weights(cfg: Config) -> bool:
    """bf16 with a sharded optimizer keeps the model in bf16 (fp32 master slices in the optimizer)."""
    return cfg.train.precision == "bf16" and cfg.dist.zero_stage >= 1


def model_state_bytes(counts: ParamCounts, stage: int, world_size: int, half: bool, grad_accum: int) -> dict:
    """Bytes per rank of weights, gradients and optimizer state: the figures dist/zero.py's state_bytes() reports.

    P = all parameters, T = trainable ones, S = shard_elements(T, N) (this rank's slice).
    stage 0 (hvd.DistributedOptimizer): fp32 weights 4P (autocast leaves them fp32), fp32 gradients 4T,
        AdamW exp_avg + exp_avg_sq 8T plus a 4-byte step counter per trainable tensor.
    stage 1: gradients stay whole (4T, or 2T in bf16 weights); the optimizer holds its slice only: 8S moments,
        plus the fp32 master copy of the slice (4S) when the model holds bf16 weights (2P).
    stage 2: a rank keeps only its fp32 gradient slice (4S): each param.grad is freed once its bucket has been
        reduce-scattered. With grad_accum > 1 the whole gradients (2T or 4T) also exist, accumulated locally
        until the last micro-step.
    LoRA: frozen base weights count in P only; gradients and optimizer state exist for the adapters (T).
    """
    P, T = counts.total, counts.trainable
    width = 2 if half else 4  # bytes per element of the model's weights and of param.grad
    if stage == 0:
        return {"weights": 4 * P, "gradients": 4 * T, "optimizer": 8 * T + 4 * counts.tensors}
    S = shard_elements(T, world_size)
    whole_grads = width * T
    gradients = whole_grads if stage == 1 else 4 * S + (whole_grads if grad_accum > 1 else 0)
    return {"weights": width * P, "gradients": gradients, "optimizer": (12 if half else 8) * S}


def _regime(cfg: Config) -> str:
    """fp32 | autocast (half-precision compute over fp32 weights) | half (bf16 weights)."""
    if half_weights(cfg):
        return "half"
    return "fp32" if cfg.train.precision == "fp32" else "autocast"


def layer_saved_bytes_per_token(m: ModelConfig, regime: str) -> int:
    """What autograd keeps for one Block per token, tensor by tensor (model.py's forward, training: no mask).

    d = dim, kv = key/value width, H = SwiGLU hidden width. Each entry is (elements, bytes per element).
    fp32: everything 4 bytes. autocast: the residual stream and RMSNorm stay fp32, every linear saves its own
    half copy of its input (autocast caches only weight casts).
    half: bf16 residual stream; RMSNorm saves its fp32 upcast; the norm output is shared by its linears.
    LoRA is not modelled: its adapters add a [tokens, rank] tensor per adapted linear, while frozen linears skip
    saving inputs nothing else needs, so full fine-tuning's figure is a close upper bound.
    """
    d, kv, H = m.dim, m.kv_heads * m.head_dim, m.ffn_hidden_dim
    # SDPA's key/value inputs: rotated k and v, or repeat_kv's copies of them (width d each) under grouped-query
    # attention (with one key/value head, or none repeated, repeat_kv returns views: no copy)
    sdpa_kv = 2 * (kv if m.kv_heads in (1, m.n_heads) else d)
    a = 2 if regime in ("autocast", "half") else 4  # bytes of a matmul output
    n = 2 if regime == "half" else 4  # bytes of a normalised input: fp32, or bf16 after type_as(x)
    tensors = [
        (d, 4),  # attention_norm: its fp32 input (the block input, or the upcast of a bf16 one)
        (d, n),  # the normalised input, before the gain
        (3 * d if regime == "autocast" else d, a),  # norm output saved by wq, wk, wv (one copy each under autocast)
        (d, a),  # rotated q (the rotation saves nothing else: cos and sin need no gradient)
        (sdpa_kv, a),  # SDPA's key and value inputs
        (d, a),  # attention output (wo's input is a view of it)
        (d, 4),  # ffn_norm: its fp32 input (h, or its upcast)
        (d, n),  # the normalised input
        (2 * d if regime == "autocast" else d, a),  # norm output saved by w1 and w3
        (4 * H, a),  # SwiGLU: w1 out, w3 out, silu(w1 out), their product (w2's input)
        (m.n_heads, 4),  # SDPA's log-sum-exp per head (flash / memory-efficient kernels)
        (2, 4),  # the two RMSNorm rsqrt factors
    ]
    return sum(n * b for n, b in tensors)


def head_saved_bytes_per_token(m: ModelConfig, regime: str) -> int:
    """The final RMSNorm, the output head and the loss: compute.py's cross_entropy upcasts the logits to fp32 and
    log_softmax saves its fp32 output (4 V); the logits themselves are not kept."""
    d, a, n = m.dim, 2 if regime != "fp32" else 4, 2 if regime == "half" else 4
    norm = 4 * d + n * d + a * d + 4  # input (fp32), normalised, output (as the output head saves it), rsqrt
    return norm + 4 * m.vocab_size


def activation_bytes(m: ModelConfig, batch_size: int, seq_len: int, regime: str, checkpointing: bool,
                     saved_only: bool = False) -> int:
    """Activation bytes of one micro-batch at its peak (the start of backward): what autograd saves, plus the
    loss's gradient buffers (and, with checkpointing, the one block being recomputed). saved_only: just what
    autograd saves at the end of the forward, the figure torch.autograd.graph.saved_tensors_hooks measures."""
    tokens = batch_size * seq_len
    layer = layer_saved_bytes_per_token(m, regime) * tokens
    residual = (2 if regime == "half" else 4) * m.dim * tokens  # a block input, what a checkpoint keeps
    per_step = (8 * batch_size * (2 * seq_len + 1)  # the int64 batch (the embedding keeps a view) and the
                # loss's flattened copy of the targets
                + 2 * seq_len * m.head_dim * 4  # RoPE cos and sin, fp32 [T, head_dim / 2], shared by every layer
                + head_saved_bytes_per_token(m, regime) * tokens)
    saved = per_step + m.n_layers * (residual if checkpointing else layer)
    if saved_only:
        return saved
    # At the start of backward the loss's gradient w.r.t. the log-probabilities and w.r.t. the logits (fp32, 4 V
    # each; plus the half-precision logits' gradient) coexist with everything saved.
    loss_grads = (8 + (2 if regime != "fp32" else 0)) * m.vocab_size * tokens
    recompute = layer if checkpointing else 0  # a checkpointed block's saved tensors live again in backward
    return saved + max(loss_grads, recompute)


def weight_copy_bytes(counts: ParamCounts, regime: str) -> int:
    """Autocast over fp32 weights casts every matmul weight to half precision once per forward and keeps the
    copy (its cache, then autograd) until backward has used it: 2 bytes per matmul weight."""
    return 2 * counts.matmul if regime == "autocast" else 0


def buffer_bytes(counts: ParamCounts, stage: int, world_size: int, half: bool) -> int:
    """Communication buffers: Horovod's fusion buffer at stage 0; with a sharded optimizer one bucket in flight:
    its fp32 reduction buffer, the all-gathered bucket of weights and, at stage 2, the param.grad tensors
    waiting for their bucket to fill."""
    if stage == 0:
        return FUSION_BUFFER if world_size > 1 else 0
    width, bucket = (2 if half else 4), min(BUCKET_ELEMENTS, counts.trainable)
    return bucket * (4 + width + (width if stage == 2 else 0))


@dataclass
class Plan:
    """Bytes per rank of one configuration."""
    parameters: int
    trainable: int
    world_size: int
    zero_stage: int
    precision: str
    batch_size: int
    grad_accum: int
    seq_len: int
    activation_checkpointing: bool
    device: str
    weights: int
    gradients: int
    optimizer: int
    activations: int  # per micro-batch, as the config runs it (checkpointed or not)
    activations_full: int  # without activation checkpointing
    activations_checkpointed: int  # with it
    weight_copies: int  # autocast's half-precision weight copies (fp32 weights, bf16/fp16 compute)
    buffers: int  # communication buffers
    overhead: int  # outside the tensors: CUDA context and allocator fragmentation, or the process's runtime
    total: int  # the peak: all of the above
    device_memory: int
    fits: bool
    max_batch_size: int = 0  # the largest train.batch_size that fits (0: not even 1)


def plan_at(cfg: Config, world_size: int, device_memory: int, device: str = "cuda",
            counts: Optional[ParamCounts] = None) -> Plan:
    """The plan of `cfg` as it is (its train.batch_size), without the max_batch_size search."""
    counts = counts or count_params(cfg)
    t, stage, regime = cfg.train, cfg.dist.zero_stage, _regime(cfg)
    half = regime == "half"
    state = model_state_bytes(counts, stage, world_size, half, t.grad_accum)
    acts = {ckpt: activation_bytes(cfg.model, t.batch_size, t.seq_len, regime, ckpt) for ckpt in (False, True)}
    activations = acts[t.activation_checkpointing]
    copies, buffers = weight_copy_bytes(counts, regime), buffer_bytes(counts, stage, world_size, half)
    # Every line can be resident at once: with grad_accum > 1 the gradients live through the next micro-batch's
    # forward, and with 1 the memory of the gradients zero_grad() freed stays reserved for the next forward
    # (PyTorch's caching allocator on a GPU; glibc's heap on a CPU, measured here to within 5%).
    tensors = state["weights"] + state["gradients"] + state["optimizer"] + activations + copies + buffers
    fixed, fragmentation = (CUDA_FIXED, CUDA_FRAGMENTATION) if device == "cuda" else (CPU_FIXED, CPU_FRAGMENTATION)
    overhead = fixed + int(fragmentation * tensors)
    total = tensors + overhead
    return Plan(parameters=counts.total, trainable=counts.trainable, world_size=world_size, zero_stage=stage,
                precision=t.precision, batch_size=t.batch_size, grad_accum=t.grad_accum, seq_len=t.seq_len,
                activation_checkpointing=t.activation_checkpointing, device=device, **state,
                activations=activations, activations_full=acts[False], activations_checkpointed=acts[True],
                weight_copies=copies, buffers=buffers, overhead=overhead, total=total,
                device_memory=device_memory, fits=total <= device_memory)


def with_train(cfg: Config, **changes) -> Config:
    return replace(cfg, train=replace(cfg.train, **changes))


def with_dist(cfg: Config, **changes) -> Config:
    return replace(cfg, dist=replace(cfg.dist, **changes))


def max_batch_size(cfg: Config, world_size: int, device_memory: int, device: str = "cuda",
                   counts: Optional[ParamCounts] = None) -> int:
    """The largest train.batch_size whose plan fits (memory grows with the batch): 0 when 1 does not."""
    counts = counts or count_params(cfg)

    def fits(batch: int) -> bool:
        return plan_at(with_train(cfg, batch_size=batch), world_size, device_memory, device, counts).fits

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):  # low fits, high does not once this ends
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def plan(cfg: Config, world_size: int, device_memory: int, device: str = "cuda") -> Plan:
    counts = count_params(cfg)
    result = plan_at(cfg, world_size, device_memory, device, counts)
    result.max_batch_size = max_batch_size(cfg, world_size, device_memory, device, counts)
    return result


def check_fits(cfg: Config, world_size: int, device_memory_bytes: int, device: str = "cuda") -> None:
    """Raise UserError, in one line naming the fixes, when the run cannot fit device_memory_bytes per rank."""
    counts = count_params(cfg)
    p = plan_at(cfg, world_size, device_memory_bytes, device, counts)
    if p.fits:
        return
    fixes = []
    if cfg.dist.zero_stage < 2:
        fixes.append("--set dist.zero_stage=2")
    if not cfg.train.activation_checkpointing:
        fixes.append("--set train.activation_checkpointing=true")
    largest = max_batch_size(cfg, world_size, device_memory_bytes, device, counts)
    if largest:
        fixes.append(f"--set train.batch_size={largest} (the largest that fits)")
    fixes.append("more ranks" + (" (with dist.zero_stage >= 1)" if cfg.dist.zero_stage == 0 else ""))
    message = (f"this run needs {gib(p.total)} per rank ({breakdown(p)}), more than the "
               f"{gib(device_memory_bytes)} of the device; try {', '.join(fixes)}")
    leanest = plan_at(with_train(with_dist(cfg, zero_stage=2), activation_checkpointing=True, batch_size=1),
                      world_size, device_memory_bytes, device, counts)
    if not leanest.fits:
        message += (f"; even dist.zero_stage=2 with activation checkpointing at train.batch_size=1 needs "
                     f"{gib(leanest.total)}, and the weights alone {gib(leanest.weights)} on every rank "
                     "(sizes beyond that need parameter sharding, ZeRO stage 3)")
    raise UserError(message + " (python -m hvd_llama.plan shows the arithmetic)")


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def breakdown(p: Plan) -> str:
    return (f"weights {gib(p.weights)}, gradients {gib(p.gradients)}, optimizer {gib(p.optimizer)}, "
            f"activations {gib(p.activations)} at train.batch_size={p.batch_size}")


SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
         "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(text: str, name: str = "--device-memory") -> int:
    """'80GiB' -> 85899345920, '80GB' -> 80000000000, '512MiB', '1e9'-free plain bytes '4096'."""
    match = SIZE.match(text)
    if not match:
        raise UserError(f"{name} {text!r}: expected a size such as 80GiB, 80GB, 512MiB or a number of bytes")
    unit = (match.group(2) or "").lower().rstrip("b") if (match.group(2) or "").lower() != "b" else ""
    value = int(float(match.group(1)) * UNITS[unit])
    if value <= 0:
        raise UserError(f"{name} {text!r}: expected a size above zero")
    return value


def parse_count(text: str, name: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise UserError(f"{name} {text!r}: expected a positive whole number")
    return int(text)


def report(p: Plan, name: str) -> list[str]:
    """The human-readable plan: one line per kind of memory, then the verdict."""
    trainable = "all trainable" if p.trainable == p.parameters else f"{p.trainable:,} trainable"
    other = "without" if p.activation_checkpointing else "with"
    other_bytes = p.activations_full if p.activation_checkpointing else p.activations_checkpointed
    lines = [f"plan for {name}: {p.parameters:,} parameters ({trainable}), {p.world_size} rank(s), "
             f"dist.zero_stage={p.zero_stage}, {p.precision}, train.batch_size={p.batch_size} x {p.seq_len} "
             f"tokens, activation checkpointing {'on' if p.activation_checkpointing else 'off'}, {p.device}",
             f"  weights                    {gib(p.weights):>12}",
             f"  gradients                  {gib(p.gradients):>12}" + (
                 "  (this rank's slice, plus the whole gradients accumulated over the micro-steps)"
                 if p.zero_stage == 2 and p.grad_accum > 1 else ""),
             f"  optimizer state            {gib(p.optimizer):>12}",
             f"  activations / micro-batch  {gib(p.activations):>12}  ({gib(other_bytes)} {other} checkpointing)"]
    if p.weight_copies:
        lines.append(f"  autocast weight copies     {gib(p.weight_copies):>12}")
    if p.buffers:
        lines.append(f"  communication buffers      {gib(p.buffers):>12}")
    lines += [f"  overhead                   {gib(p.overhead):>12}  "
              f"({'CUDA context, workspaces, fragmentation' if p.device == 'cuda' else 'runtime, allocator'})",
              f"  total                      {gib(p.total):>12}",
              f"{'fits' if p.fits else 'does NOT fit'} in {gib(p.device_memory)} per rank; largest micro-batch "
              f"that fits: " + (f"train.batch_size={p.max_batch_size}" if p.max_batch_size else "none (not even 1)")]
    return lines


TABLE_WORLD_SIZES, TABLE_STAGES = (8, 16, 64), (0, 1, 2)


def table(paths: Sequence[str], device_memory: int, overrides: Sequence[str] = ()) -> list[str]:
    """Markdown: for each preset and stage, the largest micro-batch without / with activation checkpointing
    and the model state per rank, at each world size."""
    head = "| preset | parameters | seq_len | stage | " + " | ".join(f"{n} GPUs" for n in TABLE_WORLD_SIZES) + " |"
    lines, need_stage3 = [head, "|" + " --- |" * (4 + len(TABLE_WORLD_SIZES))], []
    for path in paths:
        base = load_config(path, list(overrides))
        counts, name, fits_somewhere = count_params(base), path.rsplit("/", 1)[-1].removesuffix(".yaml"), False
        for stage in TABLE_STAGES:
            cells = []
            for n in TABLE_WORLD_SIZES:
                cfg = with_dist(base, zero_stage=stage)
                plain = max_batch_size(with_train(cfg, activation_checkpointing=False), n, device_memory,
                                       counts=counts)
                ckpt = max_batch_size(with_train(cfg, activation_checkpointing=True), n, device_memory,
                                      counts=counts)
                state = plan_at(with_train(cfg, batch_size=1), n, device_memory, counts=counts)
                fits_somewhere |= ckpt > 0
                model_state = state.weights + state.gradients + state.optimizer
                cells.append(f"{plain or '–'} / {ckpt or '–'} · {model_state / GiB:.0f} GiB")
            lines.append(f"| {name} | {counts.total / 1e9:.1f}B | {base.train.seq_len} | {stage} | "
                         + " | ".join(cells) + " |")
        if not fits_somewhere:
            need_stage3.append(name)
    lines += ["", "Cells: largest micro-batch (train.batch_size) without / with activation checkpointing "
                  "(– = not even 1) · model state per rank (weights + gradients + optimizer)."]
    lines.append("Need parameter sharding (stage 3) even at 64 GPUs: " + (", ".join(need_stage3) or "none") + ".")
    return lines


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hvd_llama.plan", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python -m hvd_llama.plan --config configs/llama2-7b.yaml --world-size 8 "
               "--device-memory 80GiB --set dist.zero_stage=2 --set train.activation_checkpointing=true\n"
               "Table:   python -m hvd_llama.plan --device-memory 80GB --table configs/llama*.yaml\n"
               "Exit status: 0 fits, 1 does not fit, 2 bad input.")
    parser.add_argument("--config", help="YAML config (see configs/); defaults apply to anything it leaves out")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set dist.zero_stage=2 (repeatable)")
    parser.add_argument("--world-size", default="1", metavar="N", help="number of ranks (default 1)")
    parser.add_argument("--device-memory", required=True, metavar="SIZE",
                        help="memory per rank: 80GiB, 80GB, 512MiB or bytes")
    parser.add_argument("--device", default="cuda", metavar="cuda|cpu",
                        help="what the fixed overhead is for: a GPU (CUDA context) or a CPU process (default cuda)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (bytes per rank)")
    parser.add_argument("--table", nargs="+", metavar="CONFIG",
                        help="print the README's markdown table for these presets (8, 16, 64 ranks; stages 0-2)")
    return parser.parse_args(argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = parse_args(argv)
    memory = parse_size(args.device_memory)
    world_size = parse_count(args.world_size, "--world-size")
    if args.device not in ("cuda", "cpu"):
        raise UserError(f"--device {args.device!r}: expected cuda or cpu")
    if args.table:
        print("\n".join(table(args.table, memory, args.set)))
        return 0
    result = plan(load_config(args.config, args.set), world_size, memory, args.device)
    print(json.dumps(asdict(result)) if args.json else "\n".join(report(result, args.config or "the defaults")))
    return 0 if result.fits else 1


def main(argv: Optional[Sequence[str]] = None) -> None:
    status = {}
    run_main(lambda a: status.setdefault("code", _main(a)), argv)
    sys.exit(status.get("code", 0))


if __name__ == "__main__":
    main()
