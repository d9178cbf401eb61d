"""Which torch device a command runs on: `auto`, `cpu` or `cuda`, checked against what torch sees."""
from __future__ import annotations

from typing import Optional

import torch

from hvd_llama.cli import UserError


def resolve_device(name: str, option: str, quantize: Optional[str] = None) -> torch.device:
    """The device `name` asks for (`auto`: CUDA when torch sees it and int8 is not requested); `option` is how
    the user spelled the setting (--device, train.device), for the error message."""
    if quantize and name == "cuda":
        raise UserError(f"--quantize {quantize} is dynamic quantization for CPU inference; use {option}=cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option}=cuda but torch sees no CUDA device (use {option}=cpu or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() and not quantize else "cpu"
    return torch.device(name)
