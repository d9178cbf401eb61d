"""What Horovod was built with and what it does on this machine: the Horovod half of `python -m hvd_llama.doctor`.

Horovod's Python API says which controllers and whether NCCL were built, but not which backend serves each
collective: a build with HOROVOD_GPU_OPERATIONS=NCCL gives every collective NCCL, one with only
HOROVOD_GPU_ALLREDUCE=NCCL leaves allgather, broadcast and reducescatter of GPU tensors to a copy through host
memory and MPI/Gloo, and nccl_built() is the same for both. So the backends are observed: one tiny call of each
collective under Horovod's timeline, which names the operation that ran (NCCL_ALLREDUCE, GLOO_BCAST, ...).
"""
from __future__ import annotations

import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import horovod
import horovod.torch as hvd
import torch
from horovod.runner.common.util import safe_shell_exec

from hvd_llama import parallel
from hvd_llama.config import DistConfig

COLLECTIVES = ("allreduce", "allgather", "broadcast", "reducescatter")
BACKENDS = {"NCCL": "NCCL", "MPI": "MPI", "GLOO": "Gloo", "CCL": "oneCCL", "DDL": "DDL"}
# Timeline lines: a tensor's own "process" (pid) is named first, then its activities carry that pid.
_TENSOR = re.compile(r'"name": "process_name", "ph": "M", "pid": (\d+), "args": \{"name": "([^"]+)"\}')
_ACTIVITY = re.compile(r'"name": "(NCCL|MPI|GLOO|CCL|DDL)_[A-Z_]+", "ts": \d+, "pid": (\d+)')


def build() -> dict:
    """Horovod's build, readable before init: the version, controllers, NCCL (its version code), CUDA, and whether
    horovodrun carries launch/install.sh's exit-status patch (a stopped job could otherwise exit 0)."""
    nccl = hvd.nccl_built()
    return {"version": horovod.__version__, "pytorch": True, "mpi_built": hvd.mpi_built(),
            "gloo_built": hvd.gloo_built(), "nccl_built": nccl_version(nccl) if nccl else None,
            "cuda_built": hvd.cuda_built(), "rocm_built": hvd.rocm_built(),
            "exit_status_patch": hasattr(safe_shell_exec, "_wait_unreaped")}


def nccl_version(code: int) -> str:
    """NCCL_VERSION_CODE as a version: major*10000+minor*100+patch since 2.9, major*1000+minor*100+patch before."""
    if code >= 20900:
        return f"{code // 10000}.{code // 100 % 100}.{code % 100}"
    return f"{code // 1000}.{code // 100 % 10}.{code % 100}"


def init(cfg: DistConfig, device: str) -> torch.device:
    """parallel.init with the timeline switchable at run time, which collective_backends needs; what would stop
    training on GPUs (parallel.gpu_error) does not stop the doctor, which reports it."""
    os.environ["HOROVOD_TIMELINE"] = "DYNAMIC"
    return parallel.init(cfg, device, check_gpus=False)


def controllers() -> dict:
    return {"mpi": {"built": hvd.mpi_built(), "enabled": hvd.mpi_enabled()},
            "gloo": {"built": hvd.gloo_built(), "enabled": hvd.gloo_enabled()}}


def local_size() -> int:
    return hvd.local_size()


def collective_backends(devices: Sequence[torch.device], timeout: float = 10.0) -> dict:
    """{device type: {collective: backend}} as rank 0's timeline recorded them (every rank must call this).

    A backend is None when the timeline did not record the call (within `timeout` seconds of stopping it).
    """
    with tempfile.TemporaryDirectory(prefix="hvd_llama_doctor.") as tmp:
        path = Path(tmp) / "timeline.json"
        hvd.start_timeline(str(path))
        names = {}
        for device in devices:
            x = torch.ones(4 * parallel.size(), device=device)
            for op in COLLECTIVES:
                name = f"doctor.probe.{device.type}.{op}"
                names[(device.type, op)] = name
                if op == "allreduce":
                    hvd.allreduce(x, op=hvd.Sum, name=name)
                elif op == "allgather":
                    hvd.allgather(x, name=name)
                elif op == "broadcast":
                    hvd.broadcast(x, root_rank=0, name=name)
                else:
                    hvd.reducescatter(x, op=hvd.Sum, name=name)
        hvd.stop_timeline()
        seen = _timeline_backends(path, len(names), timeout) if parallel.is_main() else {}
    found = {key: seen.get(f"{key[1]}.{name}") for key, name in names.items()}
    result: dict = {}
    for (device_type, op), backend in found.items():
        result.setdefault(device_type, {})[op] = backend
    return parallel.broadcast_object(result, name="doctor.backends")


def _timeline_backends(path: Path, expected: int, timeout: float) -> dict:
    """{tensor name: backend} from a timeline file; Horovod's writer thread may still be flushing it."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        tensors = dict(_TENSOR.findall(text))
        seen = {tensors[pid]: BACKENDS[kind] for kind, pid in _ACTIVITY.findall(text) if pid in tensors}
        if len(seen) >= expected or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def allreduces_bfloat16() -> Optional[str]:
    """None when Horovod sums bfloat16 tensors, else its error (Horovod 0.28 has no bfloat16 type)."""
    try:
        hvd.allreduce(torch.zeros(2, dtype=torch.bfloat16), op=hvd.Sum, name="doctor.probe.bfloat16")
    except (ValueError, TypeError, RuntimeError) as err:  # raised before any rank communicates
        return str(err)
    return None


def allreduce_bandwidth(device: torch.device, sizes: Sequence[int], iterations: int) -> list:
    """Bus bandwidth of a sum allreduce per message size, as nccl-tests reports it: 2(n-1)/n x bytes / time
    (the bytes each rank sends and receives in a ring), with the median time of `iterations` calls."""
    n = parallel.size()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows = []
    for size in sizes:
        x = torch.zeros(size // 4, device=device)  # zeros: repeated sums stay finite
        name = f"doctor.bandwidth.{size}"
        hvd.allreduce_(x, op=hvd.Sum, name=name)  # warm-up: buffers and communicators are set up on first use
        times = []
        for _ in range(iterations):
            sync()
            start = time.perf_counter()
            hvd.allreduce_(x, op=hvd.Sum, name=name)
            sync()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        rows.append({"bytes": size, "seconds": seconds, "algbw_bytes_per_s": size / seconds,
                     "busbw_bytes_per_s": 2 * (n - 1) / n * size / seconds})
    return rows
