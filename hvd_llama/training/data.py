"""Reading prepared token shards: meta.json, fixed-length training windows (pretraining), one padded row per
example (supervised fine-tuning), a resumable sampler, and the stream of a rank's training batches."""
from __future__ import annotations

import fcntl
import json
import os
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from hvd_llama.cli import UserError
from hvd_llama.files import sha256_file
from hvd_llama.prep.token_shards import (
    HEADER_BYTES,
    META_FORMAT,
    META_VERSION,
    RERUN_HINT,
    file_signature,
    read_shard_header,
    read_verified,
    record_verified,
)

SPLITS = ("train", "val")
KINDS = ("pretrain", "sft")
IGNORE_INDEX = -100  # targets with this value are left out of the loss (torch's cross_entropy default)
OPEN_SHARDS = 64  # memory maps a dataset keeps open at once (each holds a file descriptor)


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


@contextmanager
def _verification_lock(data_dir: Path) -> Iterator[None]:
    """One process at a time checks a folder's files, where the folder allows a lock: the ranks that share it (and
    a job's DataLoader workers) wait, then find the files recorded as verified."""
    try:
        lock = open(data_dir / ".verified.lock", "a")
    except OSError:  # a read-only folder: every process checks what it must
        yield
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks
            pass
        yield


def verify_files(data_dir: Path, checksums: dict[str, str], check: Callable[[Path], None], everything: bool,
                 signatures: Optional[dict[str, list]] = None) -> None:
    """Check the sha256 (and `check`) of the data files whose size or modification time changed since they were
    last found right (verified.json, which prepare writes), or of every file not checked since this call began
    with `everything`; record what was checked. Opening a verified corpus costs a stat per file (none when the
    caller has their `signatures` already)."""
    started = time.time_ns()

    def stale(signed: dict[str, list]) -> list[str]:
        record = read_verified(data_dir)
        return [name for name, entry in ((name, record.get(name)) for name in checksums)
                if entry is None or entry[:2] != signed[name] or (everything and entry[2] < started)]

    def signed_now() -> dict[str, list]:
        return {name: file_signature(data_dir / name) for name in checksums}

    if not stale(signatures or signed_now()):
        return
    with _verification_lock(data_dir):
        checked = {}
        for name in stale(signed_now()):  # again: another process may have checked them while this one waited
            path = data_dir / name
            checked[name] = file_signature(path)  # before reading: a change during the check shows next time
            check(path)
            if sha256_file(path) != checksums[name]:
                raise UserError(f"{path} does not match its checksum in meta.json (corrupted or replaced); "
                                f"{RERUN_HINT}")
        try:
            record_verified(data_dir, checked)
        except OSError:  # a read-only folder: checked again next time
            pass


class SplitTokens(Dataset):
    """A split's token stream: its shards checked against meta.json (their sizes always, their checksums when they
    changed since their last check, or all with `verify`) and memory-mapped lazily in each process, at most
    OPEN_SHARDS at once, so a dataset pickles cheaply into DataLoader workers, never loads a split into memory
    and opens a corpus of any number of shards. The base of the two training datasets, which cut it into items of
    seq_len inputs."""

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, verify: bool = False):
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if seq_len < 1:
            raise UserError(f"seq_len {seq_len} must be at least 1")
        self.data_dir = Path(data_dir)
        self.split, self.seq_len = split, seq_len
        self.meta = read_meta(self.data_dir)
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        shards = self.meta["splits"][split]["shards"]
        self.paths = [self.data_dir / shard["file"] for shard in shards]
        counts = [shard["tokens"] for shard in shards]
        signatures = {}  # [size, mtime]: one stat per shard for the size check and verify_files
        for path, n_tokens in zip(self.paths, counts):
            try:
                signatures[path.name] = file_signature(path)
            except FileNotFoundError:
                raise UserError(f"shard {path} is missing; {RERUN_HINT}") from None
            if signatures[path.name][0] != HEADER_BYTES + n_tokens * self.dtype.itemsize:
                raise UserError(f"{path} should hold {n_tokens} tokens but its size does not match (truncated?); "
                                f"{RERUN_HINT}")
        tokens = {shard["file"]: shard["tokens"] for shard in shards}
        verify_files(self.data_dir, {shard["file"]: shard["sha256"] for shard in shards},
                     lambda path: self._check_header(path, tokens[path.name]), verify, signatures)
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # shard k holds [starts[k], starts[k+1])
        self.n_tokens = int(self.starts[-1])
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()

    def _check_header(self, path: Path, n_tokens: int) -> None:
        dtype, found = read_shard_header(path)
        if dtype != self.dtype or found != n_tokens:
            raise UserError(f"{path} holds {found} {dtype.name} tokens but meta.json says {n_tokens} "
                            f"{self.dtype.name}; {RERUN_HINT}")

    def _shard(self, k: int) -> np.memmap:
        """Shard k's tokens, mapped on first use; the least recently used map is closed beyond OPEN_SHARDS."""
        if k not in self._maps:
            if len(self._maps) >= OPEN_SHARDS:
                self._maps.popitem(last=False)
            self._maps[k] = np.memmap(self.paths[k], dtype=self.dtype, mode="r", offset=HEADER_BYTES,
                                      shape=(int(self.starts[k + 1] - self.starts[k]),))
        self._maps.move_to_end(k)
        return self._maps[k]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop] of the split's stream, read across shard boundaries."""
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            end = min(stop, int(self.starts[k + 1]))
            pieces.append(self._shard(k)[start - self.starts[k]:end - self.starts[k]])
            start, k = end, k + 1
        return np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": OrderedDict()}  # reopen the memory maps in the receiving process


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

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, verify: bool = False,
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

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, verify: bool = False):
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
        verify_files(self.data_dir, {path.name: split_meta["index"]["sha256"]}, lambda _: None, verify)
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


def open_split(data_dir: str | os.PathLike, split: str, seq_len: int, verify: bool = False,
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


class SampleOrder:
    """The order in which the whole job reads training items: epoch e is a permutation of all items seeded by
    (seed, e) as torch's DistributedSampler seeds it, and epochs follow each other. A position in this order
    counts the items all ranks have read together, so it means the same at any world size: a run resumed (or
    resized by Horovod Elastic) with another number of ranks continues on exactly the items an uninterrupted
    run would read next."""

    def __init__(self, n_items: int, seed: int):
        if n_items < 1:
            raise UserError("the training split holds no windows or examples")
        self.n_items, self.seed = n_items, seed
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n_items, generator=generator).tolist()
        return self._perm

    def indices(self, position: int, count: int) -> list[int]:
        """Items position .. position + count - 1 of the order, across epoch boundaries."""
        out = []
        while count > 0:
            epoch, offset = divmod(position, self.n_items)
            taken = self.permutation(epoch)[offset:offset + count]
            out += taken
            position, count = position + len(taken), count - len(taken)
        return out


class StepBatches:
    """This rank's micro-batches of each optimizer step. A step reads the next size * grad_accum * batch_size
    items of the SampleOrder; micro-batch j of rank r is its ((j * size + r) * batch_size)-th run of
    batch_size items. What a step reads does not depend on how it is split over ranks and micro-steps."""

    def __init__(self, dataset: Dataset, order: SampleOrder, rank: int, size: int):
        self.dataset, self.order, self.rank, self.size = dataset, order, rank, size

    def step(self, position: int, batch_size: int, grad_accum: int) -> list[torch.Tensor]:
        items = self.order.indices(position, self.size * grad_accum * batch_size)
        starts = [(j * self.size + self.rank) * batch_size for j in range(grad_accum)]
        return [torch.stack([self.dataset[i] for i in items[s:s + batch_size]]) for s in starts]
