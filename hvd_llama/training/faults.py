"""Fault injection for tests and drills: HVD_LLAMA_FAULT=KIND:STEP:RANK and HVD_LLAMA_SAVE_DELAY_S=SECONDS, read once
at start-up."""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from hvd_llama.cli import UserError
from hvd_llama.training.preemption import save_delay_s


@dataclass(frozen=True)
class Fault:
    """One injected fault. Kinds: nan (a non-finite loss), raise (a crash), exit (a vanished worker), diskfull (an
    OSError in this rank's part of a save), saveerror (any other error there: a CUDA OOM, a zip writer error)."""
    kind: str = ""  # "" injects nothing
    step: int = 0
    rank: int = 0
    save_delay_s: float = 0.0  # every checkpoint save waits this long before writing (preemption.StopTime)

    KINDS = ("nan", "raise", "exit", "diskfull", "saveerror")

    @classmethod
    def from_env(cls) -> "Fault":
        spec, delay = os.environ.get("HVD_LLAMA_FAULT", ""), save_delay_s(os.environ)
        if not spec:
            return cls(save_delay_s=delay)
        kind, _, rest = spec.partition(":")
        step, _, rank = rest.partition(":")
        if kind not in cls.KINDS or not step.isdigit() or not rank.isdigit():
            raise UserError(f"HVD_LLAMA_FAULT={spec}: expected KIND:STEP:RANK with KIND one of "
                            f"{', '.join(cls.KINDS)} and STEP, RANK whole numbers")
        return cls(kind, int(step), int(rank), delay)

    def at(self, kind: str, step: int, rank: int) -> bool:
        """Whether rank `rank` injects `kind` at `step` (the caller reads its rank now: elastic runs renumber)."""
        return self.kind == kind and self.step == step and self.rank == rank

    def in_save(self, step: int, rank: int) -> None:
        """Raise the save fault this rank injects at `step`, if any."""
        if self.at("diskfull", step, rank):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        if self.at("saveerror", step, rank):
            raise RuntimeError("CUDA out of memory (injected)")
