"""Loading a model to run it (evaluate, generate): from any checkpoint or foreign folder, checked against its
config, optionally int8-quantized, optionally laid out for one-token decoding."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from hvd_llama.cli import UserError
from hvd_llama.model import Transformer
from hvd_llama.tokenizer import Tokenizer
from hvd_llama.weights import checkpoint
from hvd_llama.weights.formats import check_tensors
from hvd_llama.weights.pretrained import is_foreign_folder, read_weights, resolve_weights

QUANTIZE_CHOICES = ("int8",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --dtype: the weights' type for inference


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` with every nn.Linear replaced by a dynamically quantized int8 one (CPU only).

    Weights are stored as int8 with one scale per tensor; activations are quantized on the fly per batch,
    so no calibration data is needed. Embeddings and norms stay fp32.
    """
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; the API still works, and the warnings would
        # otherwise be the first thing every int8 run prints.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def layout_for_decoding(model: nn.Module) -> nn.Module:
    """Store every CPU Linear weight with its longer dimension contiguous; values unchanged, in place.

    Decoding one token at a time is a matrix-vector product per Linear, bound by how fast its weight streams
    from memory. MKL's fp32 GEMV (measured on a 2-core AMD EPYC) streams a row-major [out, in] weight with out > in at
    ~8.5 GB/s but the same matrix stored column-major at ~18 GB/s, and the reverse for out < in: this cut a
    decoding step of `small` by ~12%. Batched forwards are compute-bound and about as fast either way.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.device.type == "cpu":
            out_features, in_features = module.weight.shape
            if out_features > in_features:
                module.weight.data = module.weight.data.t().contiguous().t()
    return model


def check_dtype(dtype: str, quantize: Optional[str]) -> None:
    if dtype != "fp32" and quantize:
        raise UserError(f"--dtype {dtype} and --quantize {quantize} exclude each other: int8 quantizes fp32 weights")


def load_model(path, device: torch.device = torch.device("cpu"), quantize: Optional[str] = None,
               dtype: str = "fp32") -> tuple[nn.Module, Optional[Tokenizer], dict]:
    """(model in eval mode, its tokenizer or None, the checkpoint's config.yaml as a dict).

    `path` is anything pretrained.resolve_weights accepts (hvd_llama checkpoint, run or checkpoints folder, LoRA
    adapters merged into their base, a Hugging Face or Meta folder; their config dict is {}). `dtype`: a key of
    DTYPES, the weights' type (bf16 halves the memory and, on GPUs, the time; logits stay fp32). Raises
    UserError for anything unusable.
    """
    path = Path(path)
    folder = resolve_weights(path)  # a checkpoint is verified here, once
    state, model_cfg, tokenizer_path = read_weights(folder)
    config = {} if is_foreign_folder(folder) else checkpoint.read_config(folder)
    try:
        model = Transformer(model_cfg)
    except ValueError as err:
        raise UserError(f"{path}: incompatible model configuration ({err})") from None
    check_tensors(state, {k: v.shape for k, v in model.state_dict().items()},
                  f"{path} (its model.pt does not fit its config.yaml)")
    model.load_state_dict(state)
    tokenizer = Tokenizer(tokenizer_path) if tokenizer_path is not None else None
    if tokenizer is not None and tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"{tokenizer_path} has {tokenizer.vocab_size} tokens but the model only "
                        f"{model_cfg.vocab_size}: the tokenizer does not belong to this checkpoint")
    model.eval()
    if quantize == "int8":
        model = quantize_int8(model)
    return model.to(device, DTYPES[dtype]), tokenizer, config


def require_tokenizer(tokenizer: Optional[Tokenizer], path) -> Tokenizer:
    if tokenizer is None:
        raise UserError(f"checkpoint {path} has no tokenizer.model, so text cannot be encoded")
    return tokenizer

