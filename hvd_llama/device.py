"""Which torch device a command runs on: `auto`, `cpu` or `cuda`, checked against what torch sees."""
from __future__ import annotations

from typing import Optional, Sequence

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


def cuda_device_index(local_rank: int, local_size: int, device_count: int, visible: Optional[str]) -> int:
    """The CUDA device (an index into what this process sees) for the rank `local_rank` of `local_size` on a node.

    Launchers bind GPUs two ways: every rank sees every GPU of the node (mpirun, horovodrun: take the local
    rank's), or each rank sees only its own (srun --gpus-per-task=1, --gpu-bind, Kubernetes, a per-rank
    CUDA_VISIBLE_DEVICES: it is device 0, and local_rank would be an invalid ordinal). `visible` is
    CUDA_VISIBLE_DEVICES (None: unset), for the error message.
    """
    if device_count == 1:
        return 0
    if 0 < local_size <= device_count:
        return local_rank
    raise UserError(f"{local_size} ranks on this node but this process sees {device_count} CUDA device(s) "
                    f"(CUDA_VISIBLE_DEVICES={visible if visible is not None else 'unset'}): start at most one "
                    "rank per visible GPU, or give each rank its own GPU")


def gpu_uuid(index: int) -> Optional[str]:
    """The UUID of the physical GPU behind visible device `index`; None where torch cannot say (before 2.4)."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return None if uuid is None else str(uuid)


def shared_gpu(placements: Sequence[tuple[str, Optional[str]]]) -> Optional[str]:
    """The error when two ranks of one node picked the same physical GPU, else None. `placements`: every rank's
    (host, gpu_uuid of the GPU it pinned), in rank order; an unknown UUID is not compared.

    cuda_device_index cannot tell the two one-GPU-per-process bindings apart: each rank sees one GPU, its own
    (srun --gpus-per-task=1), or the same one (CUDA_VISIBLE_DEVICES=0 exported to every rank, a --gpu-bind that
    did not apply): device 0 either way. Ranks sharing a GPU would run, slowly, until it ran out of memory.
    """
    first = {}
    for rank, placement in enumerate(placements):
        if placement[1] is None:
            continue
        if placement in first:
            host, uuid = placement
            return (f"ranks {first[placement]} and {rank} on {host} both use GPU {uuid}: each rank sees one GPU but "
                    "not its own; give each rank its own GPU (srun --gpus-per-task=1, a per-rank "
                    "CUDA_VISIBLE_DEVICES), or let every rank see all of the node's GPUs")
        first[placement] = rank
    return None


def allow_tf32(device: torch.device, enabled: bool) -> None:
    """On CUDA, let fp32 matmuls use TF32 tensor cores (Ampere and later: several times the fp32 rate, with a
    10-bit mantissa, as bf16 autocast's matmuls have 7). Elsewhere nothing changes."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if enabled else "highest")
