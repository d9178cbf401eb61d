"""Reading prepared token shards: meta.json, fixed-length training windows, and a resumable sampler."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from hvd_llama.cli import UserError, sha256_file
from hvd_llama.prepare import HEADER_BYTES, META_FORMAT, META_VERSION, RERUN_HINT, read_shard_header

SPLITS = ("train", "val")


def read_meta(data_dir: str | os.PathLike) -> dict:
    """meta.json of a prepared data folder; UserError when the folder or file is missing or not ours."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data folder {data_dir} does not exist; create it with `python -m hvd_llama.prepare "
                        f"--input ... --out {data_dir}`")
    path = data_dir / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{data_dir} has no meta.json, so it is not a prepared data folder; {RERUN_HINT}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); {RERUN_HINT}") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise UserError(f"{path} was not written by hvd_llama.prepare; {RERUN_HINT}")
    if meta.get("format_version") != META_VERSION:
        raise UserError(f"{path} has format version {meta.get('format_version')}, this code reads "
                        f"{META_VERSION}; {RERUN_HINT}")
    return meta


class TokenWindows(Dataset):
    """Item i is tokens[i * seq_len : i * seq_len + seq_len + 1] of the split's concatenated token stream
    (inputs are item[:-1], targets item[1:]). Windows do not overlap except for that one shared token, and
    they pack across document boundaries. Shards are memory-mapped lazily in each process, so the dataset
    pickles cheaply into DataLoader workers and never loads a split into memory."""

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, verify: bool = True):
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if seq_len < 1:
            raise UserError(f"seq_len {seq_len} must be at least 1")
        self.data_dir = Path(data_dir)
        self.split, self.seq_len = split, seq_len
        self.meta = read_meta(self.data_dir)
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.paths, counts = [], []
        for shard in self.meta["splits"][split]["shards"]:
            path = self.data_dir / shard["file"]
            dtype, n_tokens = read_shard_header(path)
            if dtype != self.dtype or n_tokens != shard["tokens"]:
                raise UserError(f"{path} holds {n_tokens} {dtype.name} tokens but meta.json says {shard['tokens']} "
                                f"{self.dtype.name}; {RERUN_HINT}")
            if verify and sha256_file(path) != shard["sha256"]:
                raise UserError(f"{path} does not match its checksum in meta.json (corrupted or replaced); "
                                f"{RERUN_HINT}")
            self.paths.append(path)
            counts.append(n_tokens)
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # shard k holds [starts[k], starts[k+1])
        self.n_tokens = int(self.starts[-1])
        if self.n_tokens < seq_len + 1:
            raise UserError(f"the {split} split of {self.data_dir} has {self.n_tokens} tokens, fewer than one window "
                            f"of seq_len + 1 = {seq_len + 1}; use a smaller seq_len or more data")
        self._maps: Optional[list[np.memmap]] = None

    def __len__(self) -> int:
        return (self.n_tokens - 1) // self.seq_len

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        start = index * self.seq_len
        return torch.from_numpy(self.tokens(start, start + self.seq_len + 1).astype(np.int64))

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop] of the split's stream, read across shard boundaries."""
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r", offset=HEADER_BYTES,
                                    shape=(int(self.starts[k + 1] - self.starts[k]),))
                          for k, p in enumerate(self.paths)]
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        k = first
        while start < stop:
            end = min(stop, int(self.starts[k + 1]))
            pieces.append(self._maps[k][start - self.starts[k]:end - self.starts[k]])
            start, k = end, k + 1
        return np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}  # reopen the memory maps in the receiving process


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler with drop_last=True (every rank gets the same number of windows; the epoch's
    permutation depends only on seed and epoch, not on the number of ranks) and exact mid-epoch resume:
    set_position(epoch, offset) skips this rank's first `offset` indices of that epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        if self.num_samples == 0:
            raise UserError(f"the dataset has {len(dataset)} windows, fewer than the {num_replicas} ranks")
        self.offset = 0

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, offset: int) -> None:
        if not 0 <= offset <= self.num_samples:
            raise ValueError(f"offset {offset} is outside this epoch's {self.num_samples} indices per rank")
        self.epoch, self.offset = epoch, offset

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.offset:])

    def __len__(self) -> int:
        return self.num_samples - self.offset
