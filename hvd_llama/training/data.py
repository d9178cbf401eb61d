"""Reading prepared token shards: meta.json, fixed-length training windows (pretraining), one padded row per
example (supervised fine-tuning), a resumable sampler, and the stream of a rank's training batches."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from hvd_llama.cli import UserError
from hvd_llama.files import sha256_file
from hvd_llama.prep.token_shards import HEADER_BYTES, META_FORMAT, META_VERSION, RERUN_HINT, read_shard_header

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
