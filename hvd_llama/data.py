"""Reading prepared token shards: meta.json, fixed-length training windows (pretraining), one padded row per
example (supervised fine-tuning), a resumable sampler, and the stream of a rank's training batches."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from hvd_llama.cli import UserError, sha256_file
from hvd_llama.shards import HEADER_BYTES, META_FORMAT, META_VERSION, RERUN_HINT, read_shard_header

SPLITS = ("train", "val")
KINDS = ("pretrain", "sft")
IGNORE_INDEX = -100  # targets with this value are left out of the loss (torch's cross_entropy default)


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
    kind = meta.setdefault("kind", "pretrain")  # folders written before fine-tuning existed have no kind
    if kind not in KINDS:
        raise UserError(f"{path} has kind {kind!r}; this code reads {' or '.join(KINDS)}; {RERUN_HINT}")
    return meta


class SplitTokens(Dataset):
    """A split's token stream: its shards checked against meta.json and memory-mapped lazily in each process,
    so a dataset pickles cheaply into DataLoader workers and never loads a split into memory. The base of the
    two training datasets, which cut it into items of seq_len inputs."""

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
        self._maps: Optional[list[np.memmap]] = None

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


class _Windows:
    """Item i is tokens[i * seq_len : i * seq_len + seq_len + 1] of a token stream (inputs are item[:-1], targets
    item[1:]). Windows do not overlap except for that one shared token, and they pack across document
    boundaries. With `partial`, a final shorter window scores the stream's last targets too, so every target
    is scored exactly once (evaluation); training uses full windows only. Needs tokens(), n_tokens, seq_len."""

    partial = False

    def __len__(self) -> int:
        n_targets = self.n_tokens - 1
        return -(-n_targets // self.seq_len) if self.partial else n_targets // self.seq_len

    def item_shape(self, index: int) -> tuple[int]:
        start = index * self.seq_len
        return (min(start + self.seq_len + 1, self.n_tokens) - start,)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        start = index * self.seq_len
        return torch.from_numpy(self.tokens(start, start + self.item_shape(index)[0]).astype(np.int64))


class TokenWindows(_Windows, SplitTokens):
    """The windows of a prepared split (see _Windows)."""

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, verify: bool = True,
                 partial: bool = False):
        super().__init__(data_dir, split, seq_len, verify)
        self.partial = partial
        if self.n_tokens < (2 if partial else seq_len + 1):
            raise UserError(f"the {split} split of {self.data_dir} has {self.n_tokens} tokens, fewer than one window "
                            f"of seq_len + 1 = {seq_len + 1}; use a smaller seq_len or more data")


class ArrayWindows(_Windows, Dataset):
    """The windows (partial last one included) of a token stream held in memory, e.g. an encoded text file."""

    partial = True

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.array, self.n_tokens, self.seq_len = tokens, len(tokens), seq_len

    def tokens(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]


class SFTExamples(SplitTokens):
    """Supervised fine-tuning examples of a folder prepared with `prepare --sft`, one per row, no packing.

    An example is s = [bos] + prompt + response + [eos]. Item i is a LongTensor [2, seq_len]: row 0 the inputs
    s[:-1] right-padded with eos, row 1 the targets s[1:] with IGNORE_INDEX (-100) wherever the next token is
    part of the prompt (bos included) and on the padding, so the loss covers the response and the eos only.
    Attention is causal, so real tokens never attend to the right padding: every row computes exactly what
    the example alone would, and nothing leaks between examples of a batch.

    Examples longer than seq_len + 1 tokens are cut on the right (the response loses its end; counted in
    `truncated`). Examples whose prompt fills the window, so that no response token would be a target, are
    dropped (`dropped`); one warning reports both counts. len() is the number of examples kept.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, verify: bool = True):
        super().__init__(data_dir, split, seq_len, verify)
        if self.meta["kind"] != "sft":
            raise UserError(f"{self.data_dir} holds {self.meta['kind']} data, not fine-tuning examples; prepare "
                            "prompt/response examples with `python -m hvd_llama.prepare --sft`")
        self.eos_id = int(self.meta["eos_id"])
        index = self._read_index(verify)
        keep = index[:, 1] <= seq_len  # target prompt_len - 1 is the first response token (or the eos)
        self.examples = index[keep]  # rows: start, prompt length counting bos, total length
        self.dropped = int(len(index) - len(self.examples))
        self.truncated = int((self.examples[:, 2] > seq_len + 1).sum())
        if not len(index):
            raise UserError(f"the {split} split of {self.data_dir} holds no examples "
                            "(prepare it with --val-fraction > 0)")
        if not len(self.examples):
            raise UserError(f"none of the {len(index)} examples of the {split} split of {self.data_dir} fits: every "
                            f"prompt (with bos) is longer than seq_len = {seq_len} tokens; use a larger seq_len")
        if self.dropped or self.truncated:
            warnings.warn(f"{split} split of {self.data_dir}: {self.dropped} of {len(index)} examples dropped (prompt "
                          f"with bos longer than seq_len = {seq_len} tokens, so no response token fits), "
                          f"{self.truncated} truncated to seq_len + 1 = {seq_len + 1} tokens", stacklevel=2)

    def _read_index(self, verify: bool) -> np.ndarray:
        split_meta = self.meta["splits"][self.split]
        path = self.data_dir / split_meta["index"]["file"]
        if not path.is_file():
            raise UserError(f"example index {path} is missing; {RERUN_HINT}")
        if verify and sha256_file(path) != split_meta["index"]["sha256"]:
            raise UserError(f"{path} does not match its checksum in meta.json (corrupted or replaced); {RERUN_HINT}")
        try:
            index = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise UserError(f"{path} is not an example index ({err}); {RERUN_HINT}") from None
        bad = UserError(f"{path} does not describe the {split_meta['examples']} examples of the {self.split} split; "
                        f"{RERUN_HINT}")
        if index.ndim != 2 or index.shape[1] != 3 or index.dtype != np.int64 or len(index) != split_meta["examples"]:
            raise bad
        starts, prompt, total = index.T
        if ((prompt < 1) | (total <= prompt) | (starts < 0) | (starts + total > self.n_tokens)).any():
            raise bad
        return index

    def __len__(self) -> int:
        return len(self.examples)

    def item_shape(self, index: int) -> tuple[int, int]:
        return (2, self.seq_len)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range for {len(self)} examples")
        start, prompt_len, total = (int(v) for v in self.examples[index])
        length = min(total, self.seq_len + 1)
        s = torch.from_numpy(self.tokens(start, start + length).astype(np.int64))
        item = torch.full((2, self.seq_len), IGNORE_INDEX, dtype=torch.int64)
        item[0] = self.eos_id
        item[0, :length - 1] = s[:-1]
        item[1, prompt_len - 1:length - 1] = s[prompt_len:]
        return item


def open_split(data_dir: str | os.PathLike, split: str, seq_len: int, verify: bool = True,
               scoring: bool = False) -> Union[TokenWindows, SFTExamples]:
    """The items of a split: TokenWindows for a pretraining folder, SFTExamples for a --sft one. `scoring`:
    the items validation and `evaluate` score (every target once: a partial last window included)."""
    if read_meta(data_dir)["kind"] == "sft":
        return SFTExamples(data_dir, split, seq_len, verify)
    return TokenWindows(data_dir, split, seq_len, verify, partial=scoring)


def inputs_and_targets(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a stacked batch of either dataset: TokenWindows [B, T + 1] -> (batch[:, :-1], batch[:, 1:]);
    SFTExamples [B, 2, T] -> (batch[:, 0], batch[:, 1]). Both give inputs and targets of shape [B, T]."""
    if batch.ndim == 3:
        return batch[:, 0], batch[:, 1]
    return batch[:, :-1], batch[:, 1:]


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler with drop_last=True (every rank gets the same number of windows; the epoch's
    permutation depends only on seed and epoch, not on the number of ranks) and exact mid-epoch resume:
    set_position(epoch, offset) skips this rank's first `offset` indices of that epoch. It only needs len(),
    so it serves TokenWindows and SFTExamples alike."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        if self.num_samples == 0:
            raise UserError(f"the dataset has {len(dataset)} windows or examples, fewer than the {num_replicas} ranks")
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


class WindowStream:
    """This rank's training windows in sampler order, continuing across epochs and from a saved position."""

    def __init__(self, dataset: Dataset, sampler, progress):
        """`progress`: where training stands (train.Progress): its epoch and offset move as windows are read."""
        self.dataset, self.sampler, self.progress = dataset, sampler, progress
        self._indices = None

    def next_batch(self, n: int) -> torch.Tensor:
        rows = []
        while len(rows) < n:
            if self._indices is None:
                self._indices = self._begin()
            index = next(self._indices, None)
            if index is None:  # epoch done: every rank gets there at the same step (equal shares)
                self.progress.epoch, self.progress.offset, self._indices = self.progress.epoch + 1, 0, None
                continue
            rows.append(self.dataset[index])
            self._consumed_one()
        return torch.stack(rows)

    def _begin(self):
        self.sampler.set_position(self.progress.epoch, self.progress.offset)
        return iter(self.sampler)

    def _consumed_one(self) -> None:
        self.progress.offset += 1  # this rank's windows


class ElasticWindowStream(WindowStream):
    """The same over Horovod's ElasticSampler, which re-splits the epoch's remaining windows on a resize."""

    def _begin(self):
        if self.sampler.epoch != self.progress.epoch:
            self.sampler.set_epoch(self.progress.epoch)
        return iter(self.sampler)

    def _consumed_one(self) -> None:
        self.sampler.record_batch(0, 1)
        self.progress.offset = self.sampler.processed_num  # all ranks' windows: survives a resize
