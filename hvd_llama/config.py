"""Run configuration: one dataclass per concern, loaded from YAML, overridden with `--set section.key=value`.

Precedence: command line > YAML file > the defaults below (which run as they are: a tiny model on CPU).
Unknown keys and values of the wrong type are errors, reported with the key's full name.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

from hvd_llama.cli import UserError
from hvd_llama.model import ModelConfig

PRECISIONS = ("fp32", "bf16", "fp16")
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")  # the projections LoRA can adapt


@dataclass
class DataConfig:
    dir: str = "data/stdlib"  # a folder written by `hvd_llama.prepare` (meta.json, tokenizer.model, shards)
    verify: bool = False  # check every shard's checksum at start (else only shards changed since their last check)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    min_lr: float = 1e-4  # the cosine decay ends here at train.max_steps
    warmup_steps: int = 20  # linear warmup from ~0 to lr
    weight_decay: float = 0.1  # decoupled (AdamW), applied to matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping


@dataclass
class TrainConfig:
    seq_len: int = 128  # tokens per training sequence (<= model.max_seq_len)
    batch_size: int = 16  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step (Horovod's backward_passes_per_step)
    max_steps: int = 200  # optimizer steps
    seed: int = 1337  # model init and data order
    eval_every: int = 50  # optimizer steps between validation passes; 0 disables
    eval_windows: int = 64  # validation windows per pass, split over ranks; 0 = the whole split
    eval_at_start: bool = False  # also evaluate before the first step (logged as step 0), e.g. when fine-tuning
    precision: str = "fp32"  # fp32 | bf16 (autocast, fp32 master weights) | fp16 (autocast + loss scaling)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    compile: bool = False  # torch.compile each block (Transformer.compile_blocks: gradient hooks keep overlapping)
    loss_chunk: int = 4096  # tokens whose logits exist at once in the loss (see compute.model_token_losses); 0 = all
    tf32: bool = True  # CUDA: fp32 matmuls on TF32 tensor cores (fp32 precision and autocast's fp32 ops)
    activation_checkpointing: bool = False  # recompute block activations in backward to save memory
    max_bad_steps: int = 5  # non-finite steps in a row (each skipped on every rank) before training stops
    stop_grace_s: float = 0.0  # after a stop request (signal, stop file, launcher gone): seconds to checkpoint and
    # exit before a rank exits anyway (the previous checkpoint stays intact); 0 = twice a step and a save at the last
    # save's speed, at least 60 (training/preemption.py)


@dataclass
class CheckpointConfig:
    every: int = 100  # optimizer steps between checkpoints (and one at the end); 0 = only at the end
    keep: int = 3  # newest checkpoints kept; 0 keeps all


@dataclass
class LogConfig:
    every: int = 10  # optimizer steps between console lines (metrics.jsonl gets every step)
    tensorboard: bool = True  # write TensorBoard event files under <run-dir>/tensorboard
    peak_flops: float = 0.0  # per-rank peak FLOP/s for MFU; 0 = measure a matmul at start-up


@dataclass
class DistConfig:
    compression: str = "none"  # none | fp16: how gradients travel in the allreduce
    op: str = "average"  # average (the only one: adasum is refused, see validate)
    gradient_predivide_factor: float = 1.0  # split the averaging before/after the sum (fp16 range)
    threads_per_rank: int = 0  # CPU threads per rank; 0 = cores / ranks on this node
    elastic: bool = False  # run under Horovod Elastic (horovodrun --min-np/--max-np)
    commit_every: int = 10  # elastic: optimizer steps between state commits
    # Stage 0: gradients allreduced in groups of about this many parameters, in backward order (25 MB of fp32,
    # DDP's bucket); 0 = Horovod fuses whatever gradients are ready each cycle of its background loop.
    allreduce_bucket_elements: int = 6_250_000
    # Stages 1-2: parameters per reduce-scatter/all-gather bucket; 0 = 25M, or fewer for a model under 100M
    # parameters so that it spans at least 4 buckets (sharding.bucket_size).
    zero_bucket_elements: int = 0
    # 0 = replicated (hvd.DistributedOptimizer); 1 = optimizer state sharded; 2 = gradients sharded too; 3 = the
    # parameters too (each rank keeps 1/N of every weight, gathered per block as it computes: parallel/zero3.py)
    zero_stage: int = 0
    zero3_prefetch: int = 1  # stage 3: units whose all-gather is in flight while the current one computes


@dataclass
class FinetuneConfig:
    init_from: str = ""  # pretrained weights: hvd_llama checkpoint, Hugging Face folder or Meta folder
    lora_rank: int = 0  # 0 = full fine-tuning; > 0 trains only LoRA adapters of this rank
    lora_alpha: float = 16.0  # adapter scale = lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input (0 keeps ranks bit-identical)
    lora_targets: str = "wq,wv"  # comma-separated projections: wq, wk, wv, wo, w1, w2, w3, output


def split_targets(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def check_lora_targets(targets) -> tuple[str, ...]:
    """The projections LoRA adapts, each once; ValueError naming an unknown one, or none given."""
    if isinstance(targets, str):
        targets = (targets,)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(LORA_TARGETS)}")
    if not targets:
        raise ValueError(f"no LoRA targets given; choose from {', '.join(LORA_TARGETS)}")
    return tuple(dict.fromkeys(targets))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, annotation, key: str):
    """Check a YAML value against a dataclass field type; ints (and 1e-5 style strings) pass as floats."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        annotation = next(a for a in args if a is not type(None))
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation in (int, str, bool) and type(value) is annotation:
        return value
    raise UserError(f"{key}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def _section_from_dict(cls, values: dict, section: str):
    if not isinstance(values, dict):
        raise UserError(f"{section}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown config key {section}.{unknown[0]} (known: {', '.join(sorted(known))})")
    return cls(**{k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()})


def config_from_dict(values: dict) -> Config:
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise UserError(f"unknown config section {unknown[0]!r} (known: {', '.join(hints)})")
    return Config(**{name: _section_from_dict(hints[name], values.get(name) or {}, name) for name in hints})


def apply_overrides(values: dict, overrides: Sequence[str]) -> dict:
    """Apply `section.key=value` strings; the value is parsed as YAML (so 3, 3e-4, true, null work)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise UserError(f"--set {item!r}: expected section.key=value, e.g. train.max_steps=100")
        values.setdefault(section, {})
        if not isinstance(values[section], dict):
            raise UserError(f"--set {item!r}: {section} is not a section")
        values[section][name] = yaml.safe_load(raw) if raw != "" else ""
    return values


# The limits of every bounded key outside model (ModelConfig.validate checks those); validate() checks each one,
# and tests/test_config.py gives every key a wrong type, a negative, a zero and an unknown choice.
POSITIVE = ("optim.lr", "optim.eps", "train.seq_len", "train.batch_size", "train.grad_accum", "train.max_steps",
            "log.every", "dist.gradient_predivide_factor", "dist.commit_every",
            "finetune.lora_alpha")
NON_NEGATIVE = ("optim.min_lr", "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip", "train.seed",
                "train.eval_every", "train.eval_windows", "train.max_bad_steps", "checkpoint.every", "checkpoint.keep",
                "log.peak_flops", "dist.threads_per_rank", "dist.allreduce_bucket_elements",
                "dist.zero_bucket_elements", "dist.zero3_prefetch", "finetune.lora_rank",
                "train.loss_chunk", "train.stop_grace_s")
FRACTIONS = ("optim.beta1", "optim.beta2", "finetune.lora_dropout")  # 0 <= value < 1
CHOICES = {"train.precision": PRECISIONS, "train.device": ("auto", "cpu", "cuda"),
           "dist.compression": ("none", "fp16"), "dist.op": ("average", "adasum"), "dist.zero_stage": (0, 1, 2, 3)}


def half_weights(cfg: Config) -> bool:
    """bf16 with a sharded optimizer keeps the model in bf16 (fp32 master slices in the optimizer)."""
    return cfg.train.precision == "bf16" and cfg.dist.zero_stage >= 1


def value_of(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _check_limits(cfg: Config) -> None:
    for key in POSITIVE:
        if not value_of(cfg, key) > 0:
            raise UserError(f"{key} must be > 0, got {value_of(cfg, key)}")
    for key in NON_NEGATIVE:
        if not value_of(cfg, key) >= 0:
            raise UserError(f"{key} must be >= 0, got {value_of(cfg, key)}")
    for key in FRACTIONS:
        if not 0 <= value_of(cfg, key) < 1:
            raise UserError(f"{key} must be >= 0 and < 1, got {value_of(cfg, key)}")
    for key, allowed in CHOICES.items():
        if value_of(cfg, key) not in allowed:
            raise UserError(f"{key}={value_of(cfg, key)!r}: expected one of {', '.join(map(str, allowed))}")
    try:
        check_lora_targets(split_targets(cfg.finetune.lora_targets))
    except ValueError as err:
        raise UserError(f"finetune.lora_targets={cfg.finetune.lora_targets!r}: {err}") from None


def validate(cfg: Config) -> None:
    """Every key within its limits, then the cross-field checks; all before any process starts training."""
    try:
        cfg.model.validate()
    except ValueError as err:
        raise UserError(f"model: {err}") from None
    _check_limits(cfg)
    t, o, f = cfg.train, cfg.optim, cfg.finetune
    if t.seq_len > cfg.model.max_seq_len:
        raise UserError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if cfg.dist.op == "adasum":
        raise UserError("dist.op=adasum is not supported: Horovod's Adasum optimizer updates the weights inside "
                        "the gradient hooks, so gradient clipping and the non-finite step skip cannot apply (and "
                        "its skip_synchronize raises at step 1); use dist.op=average")
    if o.min_lr > o.lr:
        raise UserError(f"optim.lr={o.lr}, optim.min_lr={o.min_lr}: expected min_lr <= lr")
    if f.lora_rank and not f.init_from:
        raise UserError("finetune.lora_rank > 0 needs pretrained weights: set finetune.init_from or --init-from")
    if cfg.dist.elastic and cfg.dist.zero_stage:
        raise UserError(f"dist.elastic=true needs dist.zero_stage=0 (got {cfg.dist.zero_stage}): Horovod Elastic "
                        "re-syncs optimizer state by broadcast from rank 0, which holds only its slice; to change "
                        "the number of ranks of a sharded run, stop it and --resume auto at the new size (it reshards)")


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise UserError(f"config file {path}: expected a mapping of sections at the top level")
    cfg = config_from_dict(apply_overrides(values, overrides))
    validate(cfg)
    return cfg
