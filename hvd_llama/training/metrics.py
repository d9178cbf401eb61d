"""Rank-0 side effects of training: the console line, metrics.jsonl and TensorBoard. A no-op on other ranks."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from hvd_llama.files import atomic_write_text
from hvd_llama.procs import show

TENSORBOARD_TAGS = {  # metrics.jsonl key -> TensorBoard tag
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "tokens_per_s": "perf/tokens_per_s", "mfu": "perf/mfu", "val_loss": "val/loss", "val_ppl": "val/ppl",
    "val_windows": "val/windows", "val_tokens": "val/tokens",
    "save_s": "checkpoint/save_s", "save_bytes_per_s": "checkpoint/write_bytes_per_s",
}


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
