"""A prepare run as its ranks see it: its options, its staging folder, its plan of parts, and how the ranks share
the work and agree after each step. `ranks` is hvd_llama.parallel under a launcher, or procs.OneProcess: nothing
in prep/ imports Horovod."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from tqdm import tqdm

from hvd_llama.cli import UserError
from hvd_llama.prep.settings import PrepareOptions
from hvd_llama.prep.sources import Piece
from hvd_llama.prep.staging import Staging


@dataclass
class Run:
    options: PrepareOptions
    ranks: object
    staging: Staging
    parts: list[list[Piece]]
    workers: int

    @property
    def main(self) -> bool:
        return self.ranks.rank() == 0

    def mine(self, count: int) -> range:
        """This rank's units of `count`: unit u is rank u % size's."""
        return range(self.ranks.rank(), count, self.ranks.size())

    def my_parts(self, refs: list) -> list:
        """This rank's parts among `refs` (anything with an index)."""
        return [ref for ref in refs if ref.index % self.ranks.size() == self.ranks.rank()]

    def agree(self, name: str, work: Callable[[], object]) -> list:
        """Do this rank's share of a step, then gather every rank's result: every rank raises the first user
        error any rank met (which the others also saw in the staging folder and stopped for)."""
        result = error = None
        try:
            result = work()
        except UserError as err:
            error = str(err)
            self.staging.post_error(error)
        gathered = self.ranks.allgather_object((error, result), name=f"prepare.{name}")
        errors = [e for e, _ in gathered if e]
        if errors:
            raise UserError(errors[0])
        return [r for _, r in gathered]

    def bar(self, total: float, desc: str) -> tqdm:
        """A progress bar of this rank's share, shown by rank 0."""
        return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, mininterval=0.5,
                    disable=not self.main)


def merge_counts(items: list) -> dict:
    """Sum nested dicts of counts key by key (the first one's key order first)."""
    out: dict = {}
    for item in items:
        for key, value in item.items():
            out[key] = merge_counts([out.get(key, {}), value]) if isinstance(value, dict) else out.get(key, 0) + value
    return out
