"""Which torch device a command runs on (`auto`, `cpu` or `cuda`, checked against what torch sees), and what it can
do: its peak FLOP/s, from a datasheet or measured."""
from __future__ import annotations

import re
import time
from typing import Callable, Optional, Sequence

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


# ---- what the device can do: its peak FLOP/s (the MFU denominator) --------------------------------------
# Dense bf16/fp16 tensor-core FLOP/s from NVIDIA's datasheets (the "with sparsity" figures are twice these).
# Searched in order in torch.cuda.get_device_name(): the first pattern found names the GPU.
GPU_DATASHEET = (
    (r"H100.*NVL", "H100 NVL", 835e12),
    (r"H100.*PCIe", "H100 PCIe", 756e12),
    (r"H100", "H100 SXM", 989e12),
    (r"H200.*NVL", "H200 NVL", 835e12),
    (r"H200", "H200 SXM", 989e12),
    (r"A100", "A100", 312e12),
    (r"L40S", "L40S", 362e12),
    (r"\bL4\b", "L4", 121e12),
    (r"\bA10\b", "A10", 125e12),
)


def datasheet_peak(device_name: str, dtype: torch.dtype) -> Optional[tuple[str, float]]:
    """(GPU, dense FLOP/s) from the datasheet table, for bf16/fp16 only: an fp32 matmul's peak depends on
    whether TF32 is allowed, which a measurement sees and a table does not."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    for pattern, label, flops in GPU_DATASHEET:
        if re.search(pattern, device_name):
            return label, flops
    return None


def matmul_size(device: torch.device, dtype: torch.dtype) -> int:
    """Square matmul size for the peak: 1024 on a CPU (cheap); on a GPU 8192, large enough to fill every SM,
    halved until the three matrices take under a quarter of the free memory."""
    if device.type != "cuda":
        return 1024
    free, _ = torch.cuda.mem_get_info(device)
    n = 8192
    while n > 1024 and 3 * n * n * dtype.itemsize > free / 4:
        n //= 2
    return n


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: Optional[int] = None,
                       seconds: float = 0.3, sync: Optional[Callable[[], object]] = None) -> float:
    """FLOP/s this device reaches on large square matmuls: the best of timed batches of back-to-back matmuls.

    The device is synchronised once per batch, not after each matmul: a per-matmul sync would time the host's
    launch latency too, which on a GPU is as long as a small matmul. Batches double until one lasts a tenth of
    `seconds`, so launch and sync costs are amortised on any device.
    """
    n = n or matmul_size(device, dtype)
    sync = sync or ((lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None))
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: thread pools, kernel selection
    sync()
    best, batch, deadline = 0.0, 1, time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for _ in range(batch):
            torch.matmul(a, b, out=out)
        sync()
        elapsed = time.perf_counter() - start
        best = max(best, 2 * n**3 * batch / elapsed)
        if time.perf_counter() >= deadline:
            return best
        if elapsed < seconds / 10:
            batch *= 2


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """One rank's MFU denominator and where it comes from: the datasheet for a known GPU in bf16/fp16
    ("datasheet H100 SXM"), else a measurement ("measured")."""
    if device.type == "cuda":
        known = datasheet_peak(torch.cuda.get_device_name(device), dtype)
        if known:
            return known[1], f"datasheet {known[0]}"
    return measure_peak_flops(device, dtype), "measured"


def format_flops(flops: float) -> str:
    return f"{flops / 1e12:,.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:,.1f} GFLOP/s"
