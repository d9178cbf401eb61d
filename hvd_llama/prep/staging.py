"""The staging folder of a prepare run, next to --out: everything the ranks write before it becomes the output,
and what makes a run resumable.

    .OUT.prepare/
        job.json                  the run's identity (settings, the inputs' sizes and mtimes) and its plan of parts
        parts/00012/              a part's cleaned text and document table (corpus.py); markers read.json, encoded.json
        dedup/16/C-0003.*         bucket 3 of 16 of the document hashes of the parts C (a hash) names (dedup.py)
        tokenizer.model           with its marker tokenizer.json
        train_00012_0000.bin ...  the shards, written where they stay
        error                     the first user error of any rank: the others stop at their next unit of work

A unit of work is complete when its marker exists: a marker is written (atomically) once the unit's files are
complete and on disk, and it lists each file's size and sha256. A re-run of the same command skips complete units
and redoes the rest; a run of another command, or on inputs that changed, starts over. The ranks share the folder
(a cluster's shared filesystem, where the output goes too), so the bulk of the data never passes through
collectives.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Optional

from hvd_llama.cli import UserError
from hvd_llama.files import atomic_write_text, replace_dir
from hvd_llama.procs import say


def check_out_dir(out: Path, overwrite: bool) -> None:
    """--out may be new, empty, or (with --overwrite) a prepared corpus: never another folder."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; expected a folder")
    if not any(out.iterdir()):
        return
    if not (out / "meta.json").is_file():
        raise UserError(f"--out {out} is a non-empty folder that does not hold a prepared corpus; choose another --out")
    if not overwrite:
        raise UserError(f"--out {out} already holds a prepared corpus; pass --overwrite to replace it")


class HashingFile:
    """A binary file being written, its size and sha256 kept on the way (nothing is read back)."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self._file.write(data)
        self._sha.update(data)
        self.size += len(data)
        return len(data)

    def close(self) -> dict:
        """Flush to disk and close; returns the file's entry of a marker."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {"bytes": self.size, "sha256": self._sha.hexdigest()}


class Staging:
    """The staging folder of --out, its markers and its error flag."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.root = self.out.parent / f".{self.out.name}.prepare"
        self.error_path = self.root / "error"

    def part(self, index: int) -> Path:
        return self.root / "parts" / f"{index:05d}"

    def bucket(self, count: int, index: int, covers: str) -> Path:
        """The files of bucket `index` of `count` over the parts `covers` names share this prefix."""
        return self.root / "dedup" / str(count) / f"{covers}-{index:04d}"

    # --------------------------------------------------------------------------------------------- markers

    def done(self, marker: Path) -> Optional[dict]:
        """A marker's content if its unit is complete: the marker exists and its files have their sizes."""
        try:
            content = json.loads(marker.read_text())
        except (FileNotFoundError, ValueError):
            return None
        for name, entry in content["files"].items():
            path = self.root / name
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                return None
        return content

    def mark(self, marker: Path, content: dict, files: dict[Path, dict]) -> dict:
        """Record a complete unit: `content` plus its files (their paths relative to the folder)."""
        content = {**content, "files": {str(path.relative_to(self.root)): entry for path, entry in files.items()}}
        atomic_write_text(marker, json.dumps(content) + "\n")
        return content

    # ------------------------------------------------------------------------------------------ the ranks' errors

    def post_error(self, message: str) -> None:
        """Tell the other ranks to stop: the first message posted wins."""
        try:
            with open(self.error_path, "x") as f:
                f.write(message)
        except (FileExistsError, FileNotFoundError):  # posted already; or an error before the folder existed
            pass

    def check(self) -> None:
        """Raise the error another rank posted, if any (called between units of work)."""
        try:
            message = self.error_path.read_text()
        except FileNotFoundError:
            return
        raise UserError(message)

    # --------------------------------------------------------------------------------------------------- the job

    def open_job(self, identity: dict, inputs: list, plan: Callable[[], list]) -> tuple[dict, bool]:
        """(job, resumed): the folder's job when it was made for this identity and these inputs, else a new
        folder with a new job (its plan made now). Run on one rank."""
        job_path = self.root / "job.json"
        identity = json.loads(json.dumps(identity))  # as it reads back: tuples are lists
        try:
            job = json.loads(job_path.read_text())
        except (FileNotFoundError, ValueError):
            job = None
        if job and job["identity"] == identity and job["inputs"] == inputs:
            self.error_path.unlink(missing_ok=True)
            return job, True
        job = {"identity": identity, "inputs": inputs, "parts": plan(), "token": secrets.token_hex(8)}
        if self.root.exists():
            say(f"note: {self.root} holds an unfinished run of another command or of other inputs: starting over")
            shutil.rmtree(self.root)
        (self.root / "parts").mkdir(parents=True)
        atomic_write_text(job_path, json.dumps(job) + "\n")
        return job, False

    def check_shared(self, token: str, rank: int) -> None:
        """Stop when this rank does not see the job rank 0 wrote: the ranks must share the folder."""
        try:
            seen = json.loads((self.root / "job.json").read_text())["token"]
        except (FileNotFoundError, ValueError, KeyError):
            seen = None
        if seen != token:
            raise UserError(f"rank {rank} does not see {self.root / 'job.json'}, which rank 0 wrote: --out "
                            f"{self.out} must be on a filesystem every rank shares")

    def publish(self, keep: set[str]) -> None:
        """Delete everything but `keep` (names at the top of the folder), then rename the folder to --out."""
        for path in self.root.iterdir():
            if path.name not in keep:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        replace_dir(self.root, self.out)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
