"""Encoding stored documents into token shards, in a pool of worker processes started by a fork server."""
from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.forkserver
import signal
import sys
from contextlib import closing
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from hvd_llama.files import sha256_file
from hvd_llama.prep.corpus import Doc, Example, read_doc
from hvd_llama.prep.token_shards import ShardWriter

ENCODE_BATCH_BYTES = 1 << 20


class DocEncoder:
    """Encodes a batch of stored documents into one array of [bos] + tokens + [eos] per document."""

    def __init__(self, tokenizer_path: Path, store_path: Path, dtype: np.dtype):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
        self.store = open(store_path, "rb")
        self.dtype = dtype

    def __call__(self, docs: Sequence[Doc]) -> np.ndarray:
        encoded = self.sp.encode([read_doc(self.store, d) for d in docs], add_bos=True, add_eos=True,
                                 num_threads=1)
        return np.fromiter(itertools.chain.from_iterable(encoded), dtype=self.dtype, count=sum(map(len, encoded)))


class ExampleEncoder(DocEncoder):
    """Encodes a batch of stored examples into [bos] + prompt + response + [eos] each (prompt and response
    encoded separately, so the boundary is exact), and returns the tokens with one index row per example:
    (start within this batch, prompt length counting bos, total length)."""

    def __call__(self, examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray]:
        encoded = self.sp.encode([read_doc(self.store, d) for example in examples for d in example], num_threads=1)
        bos, eos = self.sp.bos_id(), self.sp.eos_id()
        flat: list[int] = []
        rows = np.zeros((len(examples), 3), dtype=np.int64)
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


def _encode_in_worker(docs: Sequence[Doc]):
    return _worker_encoder(docs)


def batch_docs(docs: Sequence[Doc], batch_bytes: int) -> list[list[Doc]]:
    """Consecutive documents (or examples) grouped into batches of about batch_bytes each (order kept)."""
    batches: list[list[Doc]] = [[]]
    size = 0
    for doc in docs:
        if batches[-1] and size + doc.nbytes > batch_bytes:
            batches.append([])
            size = 0
        batches[-1].append(doc)
        size += doc.nbytes
    return [b for b in batches if b]


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


def encode_batches(batches: Sequence[Sequence[Doc]], tokenizer_path: Path, store_path: Path, dtype: np.dtype,
                   workers: int, encoder: type = DocEncoder) -> Iterator:
    """encoder's output (DocEncoder: a token array) for each of `batches`, in order. workers > 1 encodes in a
    process pool (imap keeps the order, and tasks are only document offsets, so memory stays bounded);
    workers == 1 encodes in this process. Also the benchmark's entry point for single-process versus parallel
    encoding."""
    args = (tokenizer_path, store_path, dtype)
    if workers <= 1 or len(batches) <= 1:
        yield from map(encoder(*args), batches)
        return
    with encoding_context().Pool(workers, _start_worker, (encoder, *args)) as pool:
        yield from pool.imap(_encode_in_worker, batches)



def encoded_batches(split_docs: dict[str, list], tokenizer_path: Path, store_path: Path, dtype: np.dtype,
                    workers: int, encoder: type) -> Iterator[tuple[str, object]]:
    """(split name, encoder output) for every batch of every split, in order, with a progress bar."""
    batches = [(name, batch) for name, docs in split_docs.items() for batch in batch_docs(docs, ENCODE_BATCH_BYTES)]
    with tqdm(total=sum(d.nbytes for docs in split_docs.values() for d in docs), unit="B", unit_scale=True,
              desc="encode", file=sys.stderr, mininterval=0.5) as bar:
        outputs = encode_batches([b for _, b in batches], tokenizer_path, store_path, dtype, workers, encoder)
        with closing(outputs):  # on an error, stop the pool now rather than when garbage-collected
            for (name, batch), output in zip(batches, outputs):
                yield name, output
                bar.update(sum(d.nbytes for d in batch))


def encode_splits(split_docs: dict[str, list[Doc]], tokenizer_path: Path, store_path: Path, dtype: np.dtype,
                  folder: Path, shard_tokens: int, workers: int) -> dict:
    """Encode every split into its shards; returns meta.json's "splits"."""
    writers = {name: ShardWriter(folder, name, dtype, shard_tokens) for name in split_docs}
    with closing(encoded_batches(split_docs, tokenizer_path, store_path, dtype, workers, DocEncoder)) as batches:
        for name, tokens in batches:
            writers[name].write(tokens)
    splits = {}
    for name, docs in split_docs.items():
        shards = writers[name].close()
        splits[name] = {"documents": len(docs), "chars": sum(d.chars for d in docs),
                        "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    return splits


def encode_example_splits(split_examples: dict[str, list[Example]], tokenizer_path: Path, store_path: Path,
                          dtype: np.dtype, folder: Path, shard_tokens: int, workers: int) -> dict:
    """Encode every split's examples into its shards and {split}_index.npy; returns meta.json's "splits".
    prompt_tokens counts bos, response_tokens counts eos: together they are all the tokens, and
    response_tokens are exactly the tokens a fine-tuning loss is computed on."""
    writers = {name: ShardWriter(folder, name, dtype, shard_tokens) for name in split_examples}
    rows: dict[str, list[np.ndarray]] = {name: [np.zeros((0, 3), dtype=np.int64)] for name in split_examples}
    offsets = dict.fromkeys(split_examples, 0)
    with closing(encoded_batches(split_examples, tokenizer_path, store_path, dtype, workers,
                                 ExampleEncoder)) as batches:
        for name, (tokens, batch_rows) in batches:
            batch_rows[:, 0] += offsets[name]  # start within the split's token stream
            offsets[name] += len(tokens)
            writers[name].write(tokens)
            rows[name].append(batch_rows)
    splits = {}
    for name, examples in split_examples.items():
        shards = writers[name].close()
        index = np.concatenate(rows[name])
        index_file = f"{name}_index.npy"
        np.save(folder / index_file, index.astype("<i8"), allow_pickle=False)
        prompt_tokens, tokens = int(index[:, 1].sum()), int(index[:, 2].sum())
        splits[name] = {"examples": len(examples), "chars": sum(e.chars for e in examples), "tokens": tokens,
                        "prompt_tokens": prompt_tokens, "response_tokens": tokens - prompt_tokens, "shards": shards,
                        "index": {"file": index_file, "sha256": sha256_file(folder / index_file)}}
    return splits

