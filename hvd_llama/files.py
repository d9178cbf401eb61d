"""Files every stage writes: atomic writes of files and folders (readers see all or nothing), checksums, JSON."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from hvd_llama.cli import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see all or nothing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (the folder's entry list reaches the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


STAGING_MARKS = (".tmp-", ".old-")  # in the names of staging_dir's folders: being written, or being replaced


def is_staging_name(name: str) -> bool:
    """Whether `name` is one of staging_dir's folders (.OUT.tmp-XXXX being written, .OUT.old-PID being replaced)."""
    return any(mark in name for mark in STAGING_MARKS)


def new_staging_dir(out: str | os.PathLike) -> Path:
    """An empty temporary folder next to `out`, for staging_dir (which renames it to `out`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}{STAGING_MARKS[0]}"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; give the folder the usual permissions
    return tmp


@contextmanager
def staging_dir(out: str | os.PathLike, tmp: Optional[Path] = None) -> Iterator[Path]:
    """A temporary folder next to `out` (new, or `tmp` from new_staging_dir that others already wrote into),
    renamed to `out` when the block succeeds and removed if it fails.

    Readers see the old `out` or the complete new one, never a mix: an existing `out` (the caller decides
    whether replacing it is allowed) is swapped out only after the new folder is complete, then deleted.
    """
    out = Path(out)
    tmp = tmp or new_staging_dir(out)
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename the complete folder `tmp` to `out`, swapping out an existing `out` first (then deleting it)."""
    fsync_dir(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}{STAGING_MARKS[1]}{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)


def read_json(path: str | os.PathLike, what: str) -> dict:
    """A JSON file's content; UserError when it is missing ("`path.parent` is not a `what` folder") or invalid."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path.parent} is not a {what} folder: it has no {path.name}")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
