"""The one training builder: what training (and its benchmarks and tests) builds before the loop. The data check,
the model in the dtype it trains in (allocated, not initialised, on every rank but 0), LoRA, pretrained weights
read by rank 0, the data-parallel optimizer of the ZeRO stage, the fp16 loss scaler, and the memory a rank may use."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from hvd_llama import parallel
from hvd_llama.cli import UserError
from hvd_llama.config import Config, half_weights, validate
from hvd_llama.lora import apply_finetune_lora, init_adapter_, is_lora_name, trainable_param_count
from hvd_llama.model import Transformer
from hvd_llama.tokenizer import Tokenizer
from hvd_llama.training.data import read_meta
from hvd_llama.training.optim import DataParallelOptimizer, LossScaler, adamw_kwargs, param_groups
from hvd_llama.weights.pretrained import load_weights


def check_data(cfg: Config) -> dict:
    """Fail before training if the data does not fit the model (checked on every rank: no collective)."""
    meta = read_meta(cfg.data.dir)
    if meta["vocab_size"] != cfg.model.vocab_size and not cfg.finetune.init_from:  # else checked on load
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer of {cfg.data.dir} has "
                        f"{meta['vocab_size']} tokens; set --set model.vocab_size={meta['vocab_size']}")
    return meta


def build_model(cfg: Config, device: torch.device, init_state: Optional[dict], initialise: bool) -> Transformer:
    """The model on `device` in the dtype training keeps its weights in, built on the meta device first so that
    only those weights are ever allocated: bf16 weights (bf16 with a sharded optimizer; the fp32 master copy lives
    in the optimizer's slices) take 2 bytes per parameter at start-up too, with one tensor's fp32 draws at a time.

    `initialise`: draw the initial weights (seeded: the same on any world size), or load `init_state` into them.
    The other ranks only allocate theirs, since resume() overwrites every weight by broadcast: eight ranks
    initialising a 7B model on one node's host would need 216 GB of host memory for nothing.
    """
    with torch.device("meta"):
        model = Transformer(cfg.model).materialise(device, weights_dtype(cfg))
    torch.manual_seed(cfg.train.seed)
    if initialise and init_state is not None:
        model.load_state_dict(init_state)
    elif initialise:
        model.init_weights()
    apply_finetune_lora(model, cfg.finetune)  # after loading: the adapters start at zero on the pretrained weights
    return model


def build_sharded_model(cfg: Config, device: torch.device,
                        init_state: Optional[dict]) -> tuple[Transformer, parallel.ShardedParameters]:
    """ZeRO stage 3: the model built on the meta device (LoRA applied), every parameter replaced by this rank's
    slices, which every rank fills itself: from `init_state` (the pretrained weights, read one tensor at a time),
    or with the draws one process initialising the whole model makes, one parameter's fp32 tensor at a time, so
    that any world size starts from the same weights."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    apply_finetune_lora(model, cfg.finetune)
    shards = parallel.ShardedParameters(model, device, weights_dtype(cfg), cfg.dist.zero3_prefetch)
    torch.manual_seed(cfg.train.seed)
    adapters = []
    for i, (name, shape) in enumerate(zip(shards.names, shards.shapes)):
        if is_lora_name(name):
            adapters.append(i)  # drawn after the base, as apply_lora draws them
            continue
        if init_state is None:
            value = torch.empty(shape, device=device)
            model.init_parameter(name, value)
        else:
            value = init_state[name]
        shards.load(i, value)
    for i in adapters:
        value = torch.empty(shards.shapes[i], device=device)
        init_adapter_(shards.names[i], value)
        shards.load(i, value)
    return model, shards


@dataclass
class Training:
    """What a run trains: the model, its data-parallel optimizer, and the fp16 loss scaler (None otherwise)."""
    model: Transformer
    optimizer: DataParallelOptimizer
    scaler: Optional[LossScaler]


def build_training(cfg: Config, device: torch.device, init_state: Optional[dict] = None,
                   initialise: bool = True) -> Training:
    """The model (build_model), as the config runs it (activation checkpointing, compiled blocks), and the data-
    parallel optimizer over it: AdamW with weight decay on matrices, at dist.zero_stage (Horovod must be
    initialised: parallel.init)."""
    t = cfg.train
    if cfg.dist.zero_stage == 3:
        model, shards = build_sharded_model(cfg, device, init_state)
    else:
        model, shards = build_model(cfg, device, init_state, initialise), None
    model.set_activation_checkpointing(t.activation_checkpointing)
    if t.compile:
        model.compile_blocks()
    optimizer = parallel.build_data_parallel_optimizer(
        model, param_groups(model, cfg.optim.weight_decay), adamw_kwargs(cfg.optim), cfg.dist,
        stage=cfg.dist.zero_stage, grad_accum=t.grad_accum, fused=device.type == "cuda",
        bucket_elements=cfg.dist.zero_bucket_elements, shards=shards)
    return Training(model, optimizer, LossScaler() if t.precision == "fp16" else None)


def weights_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if half_weights(cfg) else torch.float32


def load_pretrained(cfg: Config, meta: dict, joining: bool = False) -> Optional[dict]:
    """Rank 0 reads the pretrained weights (at ZeRO stage 3 every rank does); every rank adopts their
    architecture. Returns the state (rank 0's, or every rank's at stage 3; None elsewhere).
    `joining`: an elastic worker added to a running job, which reads the architecture itself (no collectives:
    the others are training) and receives the weights in the state's sync."""
    if joining:
        cfg.model = load_weights(cfg.finetune.init_from)[1]
        validate(cfg)
        return None

    def read() -> tuple[dict, object]:
        state, model_cfg, tokenizer = load_weights(cfg.finetune.init_from)
        if tokenizer is not None and Tokenizer(tokenizer).sha256 != meta.get("tokenizer_sha256"):
            raise UserError(f"{cfg.data.dir} was encoded with another tokenizer than {cfg.finetune.init_from}'s; "
                            f"re-run prepare with --tokenizer {tokenizer}")
        if model_cfg.vocab_size < meta["vocab_size"]:
            raise UserError(f"{cfg.finetune.init_from} has {model_cfg.vocab_size} token embeddings but "
                            f"{cfg.data.dir}'s tokenizer has {meta['vocab_size']} tokens")
        return state, model_cfg

    if cfg.dist.zero_stage == 3:  # every rank keeps its own pieces (memory-mapped: one tensor at a time)
        state, cfg.model = parallel.run_on_all(read, name="init_from")
    else:
        loaded = parallel.run_on_main(read, name="init_from")
        state = loaded[0] if loaded else None
        cfg.model = parallel.broadcast_object(loaded[1] if loaded else None, name="init_from.model")
    validate(cfg)  # e.g. train.seq_len against the pretrained max_seq_len, on every rank alike
    return state


def lora_summary(model: torch.nn.Module, cfg: Config) -> str:
    """What LoRA saves: only the adapters' gradients cross the network."""
    trainable = trainable_param_count(model)
    base = model.num_params() - trainable
    per_value = 2 if cfg.dist.compression == "fp16" else 4
    return (f"LoRA rank {cfg.finetune.lora_rank} on {cfg.finetune.lora_targets}: {trainable:,} trainable parameters "
            f"({100 * trainable / base:.2f}% of the {base:,} frozen ones); allreduce per step "
            f"{trainable * per_value / 1e6:.3f} MB instead of {base * per_value / 1e6:.1f} MB for full fine-tuning")


def device_memory(device: torch.device) -> int:
    """What one rank may use: its GPU's memory, or on CPU its share of the node's memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // parallel.local_size()
