"""Model weights from wherever they come: an hvd_llama checkpoint (full, or LoRA adapters over a base), a
Hugging Face LLaMA folder, or Meta's original layout. One entry point for train --init-from, evaluate,
generate and convert export."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from hvd_llama.cli import UserError
from hvd_llama.config import split_targets
from hvd_llama.lora import apply_lora, load_lora_state_dict, merged_state_dict
from hvd_llama.model import ModelConfig, Transformer
from hvd_llama.weights import checkpoint
from hvd_llama.weights.formats import import_hf, import_meta


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def is_foreign_folder(path: Path) -> bool:
    """A Hugging Face or Meta folder rather than an hvd_llama checkpoint (which has its config.yaml)."""
    return path.is_dir() and (is_hf_folder(path) or (path / "params.json").is_file())


def resolve_weights(path) -> Path:
    """The folder to read weights from: a Hugging Face or Meta folder as given, else the hvd_llama checkpoint
    `path` names (a run folder: its newest good one), verified against its manifest: the one check per load."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist (expected an hvd_llama checkpoint or run folder, or a Hugging "
                        "Face or Meta LLaMA folder)")
    return path if is_foreign_folder(path) else checkpoint.resolve_checkpoint(path)


def read_weights(folder: Path) -> tuple[dict, ModelConfig, Optional[Path]]:
    """(full state dict, ModelConfig, tokenizer.model path or None) of a folder resolve_weights returned."""
    if (folder / "params.json").is_file():
        return import_meta(folder)
    if is_hf_folder(folder):
        return import_hf(folder)
    if (folder / checkpoint.ADAPTER_FILE).is_file():
        return merge_adapter_checkpoint(folder)
    return checkpoint.read_model_checkpoint(folder)


def load_weights(path) -> tuple[dict, ModelConfig, Optional[Path]]:
    """(full state dict, ModelConfig, tokenizer.model path or None) from any supported source."""
    return read_weights(resolve_weights(path))


def merge_adapter_checkpoint(ckpt: Path) -> tuple[dict, ModelConfig, Optional[Path]]:
    """A LoRA checkpoint holds only its adapters: load its base, add them, fold them into the weights."""
    finetune = checkpoint.read_config(ckpt).get("finetune") or {}
    base = finetune.get("init_from")
    if not base:
        raise UserError(f"{ckpt} holds LoRA adapters but its config.yaml names no finetune.init_from base")
    state, model_cfg, tokenizer = load_weights(base)
    model = Transformer(model_cfg)
    model.load_state_dict(state)
    apply_lora(model, finetune["lora_rank"], finetune["lora_alpha"], targets=split_targets(finetune["lora_targets"]))
    load_lora_state_dict(model, checkpoint.read_adapters(ckpt))
    own_tokenizer = ckpt / checkpoint.TOKENIZER_FILE
    return merged_state_dict(model), model_cfg, own_tokenizer if own_tokenizer.is_file() else tokenizer
