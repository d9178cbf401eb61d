"""Rank-0 side effects of training: the console line, metrics.jsonl and TensorBoard. A no-op on other ranks."""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from hvd_llama.cli import atomic_write_text
from hvd_llama.procs import show

TENSORBOARD_TAGS = {  # metrics.jsonl key -> TensorBoard tag
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "tokens_per_s": "perf/tokens_per_s", "mfu": "perf/mfu", "val_loss": "val/loss", "val_ppl": "val/ppl",
    "val_windows": "val/windows", "val_tokens": "val/tokens",
    "save_s": "checkpoint/save_s", "save_bytes_per_s": "checkpoint/write_bytes_per_s",
}


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


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricsLogger:
    """Writes one JSON object per optimizer step, TensorBoard scalars and a console line, on rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, console_every: int,
                 resume_step: Optional[int] = None):
        self.run_dir, self.tensorboard, self.console_every = Path(run_dir), tensorboard, console_every
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.enabled, self.file, self.writer = False, None, None
        self.last = None  # (offset in metrics.jsonl, record) of the last record written
        self.last_save: Optional[dict] = None  # the last record a save annotated, as read on resume
        self.set_enabled(enabled, resume_step or 0)

    def set_enabled(self, enabled: bool, step: int) -> None:
        """Whether this process logs. An elastic reset renumbers the ranks: a process that becomes rank 0 takes
        the log over, with the records after `step` dropped (they are trained again)."""
        if enabled == self.enabled:
            return
        if not enabled:
            self.close()
            self.enabled, self.writer = False, None
            return
        self.enabled = True
        self.truncate_after(step)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # rank 0 only: other ranks need not import it
            # purge_step drops events a crashed run logged after the checkpoint we resume from.
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=(step + 1) if step else None)

    def truncate_after(self, step: int) -> None:
        """Keep records up to `step`: a resumed run re-does the steps after its checkpoint."""
        if not self.enabled:
            return
        if self.file is not None:
            self.file.close()
        if self.jsonl.exists():
            records = [(line, json.loads(line)) for line in self.jsonl.read_text().splitlines() if line.strip()]
            kept = [(line, record) for line, record in records if record["step"] <= step]
            atomic_write_text(self.jsonl, "".join(line + "\n" for line, _ in kept))
            self.last_save = next((record for _, record in reversed(kept) if "save_s" in record), None)
        self.file, self.last = open(self.jsonl, "a"), None

    def log_step(self, record: dict, max_steps: int) -> None:
        if not self.enabled:
            return
        self._append(record)
        step = record["step"]
        if step % self.console_every == 0 or step == max_steps or "val_loss" in record:
            show(self.console_line(record, max_steps))

    def _append(self, record: dict, scalars: Optional[dict] = None) -> None:
        self.last = (self.file.tell(), record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self._write_scalars(scalars or record)

    def annotate_last(self, fields: dict) -> None:
        """Add `fields` to the last record: a checkpoint's figures to the step it was saved at (the save follows
        the step's record). The line is rewritten in place; TensorBoard gets the new fields only."""
        if not self.enabled or self.last is None:
            return
        offset, record = self.last
        self.file.truncate(offset)  # the file is opened for appending: the write lands at the new end
        self._append({**record, **fields}, scalars={"step": record["step"], **fields})

    def _write_scalars(self, record: dict) -> None:
        if self.writer is not None:
            for key, tag in TENSORBOARD_TAGS.items():
                if key in record and record[key] is not None and math.isfinite(record[key]):
                    self.writer.add_scalar(tag, record[key], record["step"])

    @staticmethod
    def console_line(r: dict, max_steps: int) -> str:
        parts = [f"step {r['step']}/{max_steps}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}",
                 f"grad {r['grad_norm']:.3f}", f"{r['tokens_per_s']:,.0f} tok/s", f"mfu {100 * r['mfu']:.1f}%"]
        if "val_loss" in r:
            parts.append(f"val {r['val_loss']:.4f} (ppl {r['val_ppl']:.1f}, {r['val_windows']} windows)")
        if r.get("skipped"):
            parts.append("SKIPPED (non-finite)")
        parts.append(f"eta {format_duration(r['eta_s'])}")
        return " | ".join(parts)

    def log_eval(self, step: int, validation: dict) -> None:
        """A validation-only record, e.g. step 0 before any training."""
        if not self.enabled:
            return
        record = {"step": step, **validation}
        self._append(record)
        show(f"step {step} | val {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f}, "
             f"{record['val_windows']} windows)")

    def message(self, text: str) -> None:
        if self.enabled:
            show(text)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()
