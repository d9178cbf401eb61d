"""The token shard format prepare writes and data reads (llm.c style, little-endian).

A shard is a 1024-byte header of 128 int64 [magic b"HVDLLAMA", format version, bytes per token (2: uint16,
4: uint32), token count, 0 ...], then the tokens. A split's token stream is its shards in order; meta.json
(META_FORMAT, META_VERSION) lists them with their token counts and checksums.

verified.json records each data file's size and modification time when its checksum was last found right
(prepare computes the checksums as it writes): a reader checks a file's checksum again only when these changed,
so opening a corpus costs a stat per file, not a read of its bytes.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from hvd_llama.cli import UserError
from hvd_llama.files import atomic_write_text, sha256_file

SHARD_MAGIC = int.from_bytes(b"HVDLLAMA", "little")
SHARD_VERSION = 1
HEADER_INTS = 128
HEADER_BYTES = HEADER_INTS * 8
TOKEN_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
META_FORMAT = "hvd_llama.prepare"
META_VERSION = 1
RERUN_HINT = "re-run `python -m hvd_llama.prepare` to rebuild the data folder"
VERIFIED = "verified.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return TOKEN_DTYPES[2] if vocab_size - 1 <= np.iinfo(np.uint16).max else TOKEN_DTYPES[4]


def shard_header(dtype: np.dtype, n_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i8")
    header[:4] = SHARD_MAGIC, SHARD_VERSION, dtype.itemsize, n_tokens
    return header.tobytes()


def read_shard_header(path: str | os.PathLike) -> tuple[np.dtype, int]:
    """(token dtype, token count) of a shard; UserError when the file is not a complete shard of this format."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i8")
    except FileNotFoundError:
        raise UserError(f"shard {path} is missing; {RERUN_HINT}") from None
    if len(header) != HEADER_INTS or header[0] != SHARD_MAGIC:
        raise UserError(f"{path} is not a hvd_llama token shard (bad magic number); {RERUN_HINT}")
    if header[1] != SHARD_VERSION:
        raise UserError(f"{path} has shard format version {header[1]}, this code reads {SHARD_VERSION}; {RERUN_HINT}")
    if int(header[2]) not in TOKEN_DTYPES:
        raise UserError(f"{path} has an unknown token size {header[2]}; {RERUN_HINT}")
    dtype, n_tokens = TOKEN_DTYPES[int(header[2])], int(header[3])
    if path.stat().st_size != HEADER_BYTES + n_tokens * dtype.itemsize:
        raise UserError(f"{path} should hold {n_tokens} tokens but its size does not match (truncated?); {RERUN_HINT}")
    return dtype, n_tokens


class ShardWriter:
    """Streams a token stream into {prefix}_0000.bin, {prefix}_0001.bin, ... of at most shard_tokens each."""

    def __init__(self, folder: Path, prefix: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.prefix, self.dtype, self.shard_tokens = folder, prefix, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None:
                name = f"{self.prefix}_{len(self.shards):04d}.bin"
                self._file = open(self.folder / name, "wb")
                self._file.write(shard_header(self.dtype, 0))  # rewritten with the count when the shard closes
                self.shards.append({"file": name})
            take = min(len(tokens), self.shard_tokens - self._count)
            self._file.write(tokens[:take].tobytes())
            self._count += take
            tokens = tokens[take:]
            if self._count == self.shard_tokens:
                self._finish_shard()

    def close(self) -> list[dict]:
        if self._file is not None:
            self._finish_shard()
        return self.shards

    def _finish_shard(self) -> None:
        self._file.seek(0)
        self._file.write(shard_header(self.dtype, self._count))
        self._file.close()
        self.shards[-1].update(tokens=self._count, sha256=sha256_file(self.folder / self.shards[-1]["file"]))
        self._file, self._count = None, 0


def file_signature(path: Path) -> list[int]:
    """What changes when a file is rewritten or replaced: its size and modification time."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def read_verified(folder: Path) -> dict:
    """verified.json's {file name: [size, mtime_ns, when it was verified (ns)]}; empty when there is none or it
    is unreadable."""
    try:
        return dict(json.loads((folder / VERIFIED).read_text())["files"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return {}


def record_verified(folder: Path, signatures: dict[str, list[int]]) -> None:
    """Record files of `folder` as verified now, each with its signature from before its check."""
    now = time.time_ns()
    record = {**read_verified(folder), **{name: [*signature, now] for name, signature in signatures.items()}}
    atomic_write_text(folder / VERIFIED, json.dumps({"files": record}) + "\n")
