"""Memory arithmetic of a training run: bytes per rank, whether it fits a device, the largest micro-batch that
does. `python -m hvd_llama.plan` prints it; training checks it at start-up (check_fits).

Model state (weights, gradients, AdamW state) is exact tensor arithmetic for each ZeRO stage (model_state_bytes).
Activations are the tensors autograd saves in this model's forward (model.py, compute.py's loss), counted
tensor by tensor for fp32, for bf16/fp16 autocast over fp32 weights and for bf16 weights (activation_bytes), plus
the loss's gradients at the start of backward. The total is the sum of every line: tests/test_plan.py checks the
parts against the tensors PyTorch holds and the total against the peak RSS of real training steps.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from hvd_llama.cli import UserError
from hvd_llama.config import Config, half_weights
from hvd_llama.lora import apply_finetune_lora
from hvd_llama.model import ModelConfig, Transformer
from hvd_llama.training.zero_layout import (
    MAX_IN_FLIGHT,
    FlatLayout,
    UnitLayouts,
    bucket_size,
    own_widths,
    transformer_units,
    unit_layouts,
    unit_of_parameters,
)

GiB = 1 << 30
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
    matmul: int  # weights that enter matmuls (autocast casts them to half precision in every forward)
    numels: tuple  # the sizes of the trainable (requires_grad) tensors, in model order: the ZeRO layout's input
    largest: int = 0  # the largest parameter tensor (start-up draws it in fp32 for bf16 weights)
    params: tuple = ()  # every parameter as (numel, trainable, unit) in model order: ZeRO stage 3's layouts
    sticky: tuple = ()  # per unit (training/zero_layout.py's transformer_units): gathered from first use to backward

    @property
    def trainable(self) -> int:
        """Trainable parameters: all of them, or LoRA's adapters only."""
        return sum(self.numels)

    @property
    def tensors(self) -> int:
        """Trainable parameter tensors (torch's AdamW keeps a 4-byte step counter for each)."""
        return len(self.numels)


def count_params(cfg: Config) -> ParamCounts:
    """Counted on the meta device from the real modules (LoRA applied as train applies it): no memory used."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
        apply_finetune_lora(model, cfg.finetune)
    params = dict(model.named_parameters())  # named_parameters yields a tied matrix once
    trainable = [p for p in params.values() if p.requires_grad]
    embedding = model.tok_embeddings.weight
    matmul = sum(p.numel() for p in params.values() if p.ndim == 2 and (p is not embedding or cfg.model.tie_embeddings))
    units = transformer_units(model)
    unit_of = unit_of_parameters(list(params.items()), units)
    return ParamCounts(total=sum(p.numel() for p in params.values()), matmul=matmul,
                       numels=tuple(p.numel() for p in trainable), largest=max(p.numel() for p in params.values()),
                       params=tuple((p.numel(), p.requires_grad, u) for p, u in zip(params.values(), unit_of)),
                       sticky=tuple(sticky for _, _, sticky in units))


def zero_layout(counts: ParamCounts, world_size: int, bucket_elements: int = 0) -> FlatLayout:
    """The flat layout parallel/zero.py builds for these parameters (every rank's slice has the same size)."""
    return FlatLayout(counts.numels, world_size, 0, bucket_size(counts.trainable, bucket_elements))


@dataclass(frozen=True)
class UnitSizes:
    """ZeRO stage 3's figures of one unit, in elements."""
    full: int  # gathered: every rank's slices, padding included
    trainable: int  # its trainable parameters (their param.grad, whole, until the unit's reduction)
    reduced: int  # the flat fp32 buffer its gradients are reduced in (the trainable bucket, padded)
    sticky: bool


def zero3_sizes(counts: ParamCounts, world_size: int) -> tuple[UnitLayouts, list[UnitSizes]]:
    """The layouts parallel/zero3.py builds for these parameters, and every unit's sizes."""
    numels, trainable, unit_of = zip(*counts.params)
    layouts = unit_layouts(list(numels), list(trainable), list(unit_of), world_size, 0)
    sizes = []
    for unit, sticky in enumerate(counts.sticky):
        t, f = layouts.unit_buckets(unit)
        own_t, own_f = own_widths((t, f))
        sizes.append(UnitSizes(world_size * (own_t + own_f), t.numel if t else 0, world_size * own_t, sticky))
    return layouts, sizes


def zero3_state_bytes(counts: ParamCounts, world_size: int, half: bool, prefetch: int) -> dict:
    """Stage 3: the rank's slices of every weight (2 or 4 bytes each), of the fp32 gradients and of AdamW (12 or 8
    bytes per trainable element), plus at the peak the units gathered (the embedding and the head, the block
    computing and `prefetch` more) and one unit's whole param.grad before its reduction."""
    layouts, sizes = zero3_sizes(counts, world_size)
    width = width_of(half)
    slices_t, slices_f = (layout.shard_numel for layout in layouts.layouts)
    blocks = [u.full for u in sizes if not u.sticky]
    gathered = sum(u.full for u in sizes if u.sticky) + sum(sorted(blocks, reverse=True)[:prefetch + 1])
    return {"weights": width * (slices_t + slices_f + gathered),
            "gradients": 4 * slices_t + width * max(u.trainable for u in sizes),
            "optimizer": (12 if half else 8) * slices_t}


def model_state_bytes(counts: ParamCounts, stage: int, world_size: int, half: bool, grad_accum: int,
                      bucket_elements: int = 0, prefetch: int = 1) -> dict:
    """Bytes per rank of weights, gradients and optimizer state: the figures parallel/zero.py's state_bytes() reports.

    P = all parameters, T = trainable ones, S = this rank's slice of zero_layout (ceil(T / N) plus under one
    element of padding per bucket; `bucket_elements`: dist.zero_bucket_elements).
    stage 0 (hvd.DistributedOptimizer): fp32 weights 4P (autocast leaves them fp32), fp32 gradients 4T,
        AdamW exp_avg + exp_avg_sq 8T plus a 4-byte step counter per trainable tensor.
    stage 1: gradients stay whole (4T, or 2T in bf16 weights) until zero_grad(), next to the slice they are
        reduce-scattered into (4S, or 2S in bf16 weights); the optimizer holds its slice only: 8S moments, plus
        the fp32 master copy of the slice (4S) when the model holds bf16 weights (2P).
    stage 2: a rank keeps only its gradient slice (4S, or 2S in bf16 weights): each param.grad is freed once
        its bucket has been reduce-scattered. In bf16 that is ZeRO's 2 + 14/N bytes per parameter.
    grad_accum > 1, stages 1 and 2: the micro-steps' gradients are summed in fp32 flat bucket buffers, every
        bucket padded to a multiple of N (4NS: Megatron-LM's main_grad), whole until the last micro-step
        reduces them; param.grad is freed as each pass adds it in.
    LoRA: frozen base weights count in P only; gradients and optimizer state exist for the adapters (T).
    stage 3: zero3_state_bytes.
    """
    P, T = counts.total, counts.trainable
    width = width_of(half)
    if stage == 3:
        return zero3_state_bytes(counts, world_size, half, prefetch)
    if stage == 0:
        return {"weights": 4 * P, "gradients": 4 * T, "optimizer": 8 * T + 4 * counts.tensors}
    S = zero_layout(counts, world_size, bucket_elements).shard_numel
    if grad_accum > 1:
        whole_grads = 4 * world_size * S
    else:
        whole_grads = width * T if stage == 1 else 0
    return {"weights": width * P, "gradients": width * S + whole_grads, "optimizer": (12 if half else 8) * S}


def startup_bytes(counts: ParamCounts, half: bool, stage: int = 0, world_size: int = 1) -> int:
    """Start-up's peak (builder.build_model): the weights, allocated in their own dtype, plus one tensor's fp32
    draws at a time when they are bf16 (model.init_fp32_). Stage 3: the rank's slices, one unit's full buffer
    (allocated to make the parameters its views) and one parameter drawn in fp32."""
    width = width_of(half)
    if stage != 3:
        return width * counts.total + (4 * counts.largest if half else 0)
    layouts, sizes = zero3_sizes(counts, world_size)
    return width * (sum(layout.shard_numel for layout in layouts.layouts) + max(u.full for u in sizes)) \
        + 4 * counts.largest


def width_of(half: bool) -> int:
    """Bytes per element of the model's weights and of param.grad: bf16 or fp32."""
    return 2 if half else 4


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


def buffer_bytes(counts: ParamCounts, stage: int, world_size: int, half: bool, grad_accum: int = 1,
                 bucket_elements: int = 0, prefetch: int = 1) -> int:
    """Communication buffers: Horovod's fusion buffer at stage 0; with a sharded optimizer as many all-gathered
    buckets of weights as are in flight (MAX_IN_FLIGHT + 1 at the peak) and, with one backward pass per step,
    the fp32 flat buffers of as many reduce-scatters and, at stage 2, the param.grad tensors waiting for their
    bucket to fill (with grad_accum > 1 the accumulation buffers, counted as gradients, are reduced themselves)."""
    if stage == 0:
        return FUSION_BUFFER if world_size > 1 else 0
    if stage == 3:  # the reductions in flight, and the all-gathers' outputs before they are copied out
        _, sizes = zero3_sizes(counts, world_size)
        in_flight = min(MAX_IN_FLIGHT + 1, sum(1 for u in sizes if u.trainable))
        blocks = sorted((u.full for u in sizes if not u.sticky), reverse=True)
        return 4 * max(u.reduced for u in sizes) * in_flight + width_of(half) * sum(blocks[:prefetch + 1])
    buckets = zero_layout(counts, world_size, bucket_elements).buckets
    width, bucket = width_of(half), max(b.numel for b in buckets)  # a parameter larger than the size: alone
    in_flight = min(MAX_IN_FLIGHT + 1, len(buckets))
    reductions = 0 if grad_accum > 1 else bucket * (4 * in_flight + (width if stage == 2 else 0))
    return width * bucket * in_flight + reductions


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
    startup: int  # start-up's peak before the first step (the weights and one tensor's initialisation)
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
    bucket = cfg.dist.zero_bucket_elements
    prefetch = cfg.dist.zero3_prefetch
    state = model_state_bytes(counts, stage, world_size, half, t.grad_accum, bucket, prefetch)
    acts = {ckpt: activation_bytes(cfg.model, t.batch_size, t.seq_len, regime, ckpt) for ckpt in (False, True)}
    activations = acts[t.activation_checkpointing]
    copies = weight_copy_bytes(counts, regime)
    buffers = buffer_bytes(counts, stage, world_size, half, t.grad_accum, bucket, prefetch)
    # Every line can be resident at once: with grad_accum > 1 the gradients live through the next micro-batch's
    # forward, and with 1 the memory of the gradients zero_grad() freed stays reserved for the next forward
    # (PyTorch's caching allocator on a GPU; glibc's heap on a CPU, measured here to within 5%).
    tensors = state["weights"] + state["gradients"] + state["optimizer"] + activations + copies + buffers
    startup = startup_bytes(counts, half, stage, world_size)
    tensors = max(tensors, startup)  # start-up's transient is gone before the first step's tensors exist
    fixed, fragmentation = (CUDA_FIXED, CUDA_FRAGMENTATION) if device == "cuda" else (CPU_FIXED, CPU_FRAGMENTATION)
    overhead = fixed + int(fragmentation * tensors)
    total = tensors + overhead
    return Plan(parameters=counts.total, trainable=counts.trainable, world_size=world_size, zero_stage=stage,
                precision=t.precision, batch_size=t.batch_size, grad_accum=t.grad_accum, seq_len=t.seq_len,
                activation_checkpointing=t.activation_checkpointing, device=device, **state,
                activations=activations, activations_full=acts[False], activations_checkpointed=acts[True],
                weight_copies=copies, buffers=buffers, startup=startup, overhead=overhead, total=total,
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
    if cfg.dist.zero_stage < 3:
        fixes.append(f"--set dist.zero_stage={3 if world_size > 1 else 2}")
    if not cfg.train.activation_checkpointing:
        fixes.append("--set train.activation_checkpointing=true")
    largest = max_batch_size(cfg, world_size, device_memory_bytes, device, counts)
    if largest:
        fixes.append(f"--set train.batch_size={largest} (the largest that fits)")
    fixes.append("more ranks" + (" (with dist.zero_stage >= 1)" if cfg.dist.zero_stage == 0 else ""))
    message = (f"this run needs {gib(p.total)} per rank ({breakdown(p)}), more than the "
               f"{gib(device_memory_bytes)} of the device; try {', '.join(fixes)}")
    leanest = plan_at(with_train(with_dist(cfg, zero_stage=3), activation_checkpointing=True, batch_size=1),
                      world_size, device_memory_bytes, device, counts)
    if not leanest.fits:
        message += (f"; even dist.zero_stage=3 with activation checkpointing at train.batch_size=1 needs "
                    f"{gib(leanest.total)} per rank: more ranks")
    raise UserError(message + " (python -m hvd_llama.plan shows the arithmetic)")


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def breakdown(p: Plan) -> str:
    return (f"weights {gib(p.weights)}, gradients {gib(p.gradients)}, optimizer {gib(p.optimizer)}, "
            f"activations {gib(p.activations)} at train.batch_size={p.batch_size}")
