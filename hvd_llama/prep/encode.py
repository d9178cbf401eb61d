"""Encoding a part's kept documents into its token shards, in a pool of worker processes started by a fork server.

A part's split is encoded in the corpus's order into {split}_{part:05d}_0000.bin, ...: a split's token stream is
its parts' shards in part order, so the stream does not depend on which rank encoded what. Fine-tuning examples
also get a per-part index of (start, prompt length counting bos, total length), merged into {split}_index.npy
when every part is done.
"""
from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.forkserver
import signal
from contextlib import closing
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from hvd_llama.prep.corpus import CHARS, HEAD_NBYTES, NBYTES, OFFSET, read_texts, save_array
from hvd_llama.prep.token_shards import ShardWriter
from hvd_llama.procs import peak_rss

ENCODE_BATCH_BYTES = 1 << 20
RANGE_OFFSET, RANGE_HEAD, RANGE_NBYTES = range(3)  # columns of an array of store ranges


class DocEncoder:
    """Encodes a batch of stored documents, (store path, int64 [n, 3] ranges of offset, head bytes, bytes), into
    one array of [bos] + tokens + [eos] per document."""

    def __init__(self, tokenizer_path: Path, dtype: np.dtype):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
        self.dtype = dtype
        self._store, self._store_path = None, None

    def texts(self, store_path: str, ranges: np.ndarray) -> list[bytes]:
        if store_path != self._store_path:
            if self._store is not None:
                self._store.close()
            self._store, self._store_path = open(store_path, "rb"), store_path
        out = []
        for offset, _, nbytes in ranges.tolist():
            self._store.seek(offset)
            out.append(self._store.read(nbytes))
        return out

    def __call__(self, task: tuple[str, np.ndarray]) -> np.ndarray:
        encoded = self.sp.encode([t.decode("utf-8") for t in self.texts(*task)], add_bos=True, add_eos=True,
                                 num_threads=1)
        return np.fromiter(itertools.chain.from_iterable(encoded), dtype=self.dtype, count=sum(map(len, encoded)))


class ExampleEncoder(DocEncoder):
    """Encodes a batch of stored examples into [bos] + prompt + response + [eos] each (prompt and response
    encoded separately, so the boundary is exact), and returns the tokens with one index row per example:
    (start within this batch, prompt length counting bos, total length)."""

    def __call__(self, task: tuple[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        data = self.texts(*task)
        pairs = [(d[:head].decode("utf-8"), d[head:].decode("utf-8")) for d, head in zip(data, task[1][:, RANGE_HEAD])]
        encoded = self.sp.encode([text for pair in pairs for text in pair], num_threads=1)
        bos, eos = self.sp.bos_id(), self.sp.eos_id()
        flat: list[int] = []
        rows = np.zeros((len(pairs), 3), dtype=np.int64)
        for row, prompt, response in zip(rows, encoded[0::2], encoded[1::2]):
            row[:] = len(flat), 1 + len(prompt), 2 + len(prompt) + len(response)
            flat.append(bos)
            flat.extend(prompt)
            flat.extend(response)
            flat.append(eos)
        return np.array(flat, dtype=self.dtype), rows


_worker_encoder: Optional[DocEncoder] = None


def _start_worker(encoder: type, *encoder_args) -> None:
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it terminates the pool
    _worker_encoder = encoder(*encoder_args)


def _encode_in_worker(task):
    return _worker_encoder(task)


def batch_ranges(ranges: np.ndarray, batch_bytes: int) -> list[np.ndarray]:
    """Consecutive ranges grouped into batches of about batch_bytes each (order kept)."""
    ends = np.cumsum(ranges[:, RANGE_NBYTES])
    groups = ends // batch_bytes  # batch k holds the ranges whose text ends in [k, k + 1) * batch_bytes
    cuts = np.flatnonzero(np.diff(groups)) + 1
    return [batch for batch in np.split(ranges, cuts) if len(batch)]


def encoding_context() -> multiprocessing.context.BaseContext:
    """Start method of the encoding pool: a fork server where the OS has one, else spawn.

    Workers forked from an already running fork server start in ~10 ms, where spawned ones each spend
    ~0.2 s importing numpy and SentencePiece again (5% of encoding 32 MB on two cores). Not plain fork: by
    then this process has threads (OpenBLAS's, tqdm's monitor), and forking a threaded process can deadlock.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # this module alone: not the command run as __main__
    return context


def start_encoding_server(workers: int) -> None:
    """Start the fork server now, so that it imports its modules while this process reads the corpus."""
    if workers > 1 and encoding_context().get_start_method() == "forkserver":
        multiprocessing.forkserver.ensure_running()


def encode_batches(tasks: Sequence[tuple[str, np.ndarray]], tokenizer_path: Path, dtype: np.dtype, workers: int,
                   encoder: type = DocEncoder, peaks: Optional[list] = None) -> Iterator:
    """encoder's output (DocEncoder: a token array) for each task (store path, ranges), in order. workers > 1
    encodes in a process pool (imap keeps the order, and tasks are only offsets, so memory stays bounded), and
    appends the workers' peak memory to `peaks`; workers == 1 encodes in this process. Also the benchmark's entry
    point for single-process versus parallel encoding."""
    args = (tokenizer_path, dtype)
    if workers <= 1 or len(tasks) <= 1:
        yield from map(encoder(*args), tasks)
        return
    with encoding_context().Pool(workers, _start_worker, (encoder, *args)) as pool:
        for i, output in enumerate(pool.imap(_encode_in_worker, tasks)):
            if i == len(tasks) - 1 and peaks is not None:  # the workers have done their share and are still there
                peaks.extend(peak_rss(p.pid) for p in multiprocessing.active_children())
            yield output


# -------------------------------------------------------------------------------------------------- a part

def part_ranges(store: Path, table: np.ndarray, rows: np.ndarray, training_chars: np.ndarray) -> dict[str, np.ndarray]:
    """The store ranges (offset, head bytes, bytes) of a part's kept rows, per split: whole rows by their training
    characters, and the document a character split cuts in two (training head, validation tail)."""
    columns = np.stack([np.asarray(table[k])[rows].astype(np.int64) for k in (OFFSET, HEAD_NBYTES, NBYTES)], axis=1)
    chars = np.asarray(table[CHARS])[rows].astype(np.int64)
    train, val = columns[training_chars == chars], columns[training_chars == 0]
    cut = np.flatnonzero((training_chars > 0) & (training_chars < chars))
    if len(cut):  # its head is the last training text, its tail the first validation text
        offset, _, nbytes = columns[cut[0]]
        with open(store, "rb") as f:
            text = read_texts(f, table, int(rows[cut[0]]), examples=False)[0]
        head = len(text[:int(training_chars[cut[0]])].encode("utf-8"))
        train = np.concatenate([train, [[offset, 0, head]]])
        val = np.concatenate([[[offset + head, 0, nbytes - head]], val])
    return {"train": train, "val": val}


def split_counts(table: np.ndarray, rows: np.ndarray, training_chars: np.ndarray, examples: bool) -> dict:
    """Each split's kept documents (a cut document in both) or examples and characters, for meta.json."""
    chars = np.asarray(table[CHARS])[rows].astype(np.int64)
    unit = "examples" if examples else "documents"
    return {"train": {unit: int((training_chars > 0).sum()), "chars": int(training_chars.sum())},
            "val": {unit: int((training_chars < chars).sum()), "chars": int((chars - training_chars).sum())}}


def encode_part(store: Path, ranges: dict[str, np.ndarray], encode: Callable, folder: Path, index_folder: Path,
                prefix: str, dtype: np.dtype, shard_tokens: int, examples: bool) -> tuple[dict, dict[Path, dict]]:
    """Encode a part's ranges into its shards {split}_{prefix}_NNNN.bin in `folder` (and, for examples, its index
    {split}_index.npy in index_folder); returns each split's tokens and shards, and the files written."""
    writers = {name: ShardWriter(folder, f"{name}_{prefix}", dtype, shard_tokens) for name in ranges}
    tasks = [(name, (str(store), batch)) for name, r in ranges.items() for batch in batch_ranges(r, ENCODE_BATCH_BYTES)]
    rows = {name: [np.zeros((0, 3), np.int64)] for name in ranges}
    offsets = dict.fromkeys(ranges, 0)
    with closing(encode([task for _, task in tasks])) as outputs:
        for (name, _), output in zip(tasks, outputs):
            tokens, batch_rows = output if examples else (output, None)
            if examples:
                batch_rows[:, 0] += offsets[name]  # start within this part's stream of the split
                rows[name].append(batch_rows)
            offsets[name] += len(tokens)
            writers[name].write(tokens)
    splits, files = {}, {}
    for name, writer in writers.items():
        shards = writer.close()
        splits[name] = {"tokens": offsets[name], "shards": shards}
        files.update({folder / s["file"]: {"bytes": (folder / s["file"]).stat().st_size, "sha256": s["sha256"]}
                      for s in shards})
        if examples:
            index = np.concatenate(rows[name]).astype("<i8")
            files.update(save_array(index_folder / f"{name}_index.npy", index))
            splits[name]["prompt_tokens"] = int(index[:, 1].sum())
    return splits, files
