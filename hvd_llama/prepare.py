"""Turn raw text into token shards: read, clean, split, train a tokenizer, encode in parallel, write.

    python -m hvd_llama.prepare --input stdlib --out data/stdlib                 # pretraining ("kind": "pretrain")
    python -m hvd_llama.prepare --sft --input chat.jsonl --out data/chat        # fine-tuning ("kind": "sft")

writes DIR/{tokenizer.model, meta.json, train_0000.bin ..., val_0000.bin ...}. Everything is written into a
temporary folder next to DIR and renamed at the end, so DIR is either complete or untouched.

Shard file (little-endian, llm.c style): a 1024-byte header of 128 int64 [magic b"HVDLLAMA", format
version, bytes per token (2: uint16, 4: uint32), token count, 0 ...], then the tokens. Each document is
stored as [bos] + tokens + [eos]; documents are packed back to back, and a split may span several shards.

Supervised fine-tuning (--sft) reads JSON lines with a prompt and a response field. Each example is stored as
[bos] + encode(prompt) + encode(response) + [eos] in the same shards, and DIR/{split}_index.npy (int64
[examples, 3]) holds one row per example: start offset in the split's token stream, prompt length counting
bos, total length. The only cleaning is --unicode-form normalisation (NFC by default) and removal of control
characters other than tab, newline and carriage return; exact duplicate examples are dropped. Examples are
split by content hash like documents, whatever their number.
"""
from __future__ import annotations

import argparse
import fnmatch
import gzip
import itertools
import json
import multiprocessing
import multiprocessing.forkserver
import os
import platform
import random
import shlex
import shutil
import signal
import sys
import sysconfig
import time
import zlib
from contextlib import closing, contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
from tqdm import tqdm

from hvd_llama.cli import UserError, atomic_write_text, run_main, sha256_file
from hvd_llama.text import (CHAR_STEPS, CLEAN_STEPS, DEFAULT_CLEAN, Cleaner, decode_utf8, document_hash,
                            normalize_unicode, parse_steps, remove_control_chars, sentence_chunks)
from hvd_llama.tokenizer import Tokenizer, train_tokenizer

SHARD_MAGIC = int.from_bytes(b"HVDLLAMA", "little")
SHARD_VERSION = 1
HEADER_INTS = 128
HEADER_BYTES = HEADER_INTS * 8
TOKEN_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
META_FORMAT = "hvd_llama.prepare"
META_VERSION = 1
RERUN_HINT = "re-run `python -m hvd_llama.prepare` to rebuild the data folder"

STDLIB = "stdlib"
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
SFT_INCLUDE = ("*.jsonl", "*.ndjson")
DEFAULT_INCLUDE = ("*.txt", "*.md", "*.rst", "*.jsonl", "*.ndjson", "*.py", "*.pyi", "*.c", "*.h", "*.cc",
                   "*.cpp", "*.hpp", "*.cu", "*.java", "*.js", "*.ts", "*.go", "*.rs", "*.rb", "*.sh", "*.toml",
                   "*.yaml", "*.yml", "*.tex")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
MIN_DOCS_FOR_DOCUMENT_SPLIT = 20  # fewer documents are split by characters (nanoGPT's tiny Shakespeare rule)
TOKENIZER_SENTENCE_CHARS = 1000
ENCODE_BATCH_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------- shard format

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
    """Streams one split's tokens into {split}_0000.bin, {split}_0001.bin, ... of at most shard_tokens each."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None:
                name = f"{self.split}_{len(self.shards):04d}.bin"
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


# ----------------------------------------------------------------------------------------------- input files

def stdlib_files() -> list[Path]:
    """The running Python's standard library sources, without tests and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted((p for p in root.rglob("*.py") if not STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1])),
                  key=lambda p: p.relative_to(root).as_posix())


def _matches(relative: str, patterns: Sequence[str]) -> bool:
    name = relative.rsplit("/", 1)[-1]
    names = (relative, name, name[:-3] if name.endswith(".gz") else name)  # *.txt also matches a.txt.gz
    return any(fnmatch.fnmatch(n, p) for n in names for p in patterns)


def find_input_files(inputs: Sequence[str], include: Sequence[str], exclude: Sequence[str]) -> list[Path]:
    """Expand --input values into an ordered list of files. Folders are walked recursively in sorted order,
    skipping hidden entries; files named explicitly are always read."""
    files: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if spec == STDLIB:
            root = Path(sysconfig.get_paths()["stdlib"])
            files += [p for p in stdlib_files() if not _matches(p.relative_to(root).as_posix(), exclude)]
        elif path.is_file():
            files.append(path)
        elif path.is_dir():
            found = []
            for p in path.rglob("*"):
                relative = p.relative_to(path).as_posix()
                if (p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                        and _matches(relative, include) and not _matches(relative, exclude)):
                    found.append((relative, p))
            if not found:
                raise UserError(f"--input {spec} holds no files matching --include {' '.join(include)}")
            files += [p for _, p in sorted(found)]
        else:
            raise UserError(f"--input {spec} does not exist (expected a file, a folder, or '{STDLIB}')")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    if not unique:
        raise UserError(f"no input files found in {' '.join(inputs)}")
    return unique


@contextmanager
def open_input(path: Path) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """(raw file, decompressed stream) of an input file that may be gzip-compressed (.gz)."""
    with open(path, "rb") as raw:
        try:
            yield raw, gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise UserError(f"{path} is not a valid gzip file ({err})") from None


def read_documents(path: Path, jsonl_field: str) -> Iterator[tuple[str, int, int]]:
    """Yield (text, undecodable bytes replaced, bytes of the file consumed so far) per document: one per
    plain-text file, one per line of a JSON-lines file; either may be gzip-compressed (.gz)."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(JSONL_SUFFIXES):
        for (number, record), bad, position in read_json_lines(path):
            yield record_text(record, jsonl_field, path, number, "text", "--jsonl-field"), bad, position
        return
    with open_input(path) as (raw, stream):
        text, bad = decode_utf8(stream.read())
        yield text, bad, raw.tell()


def read_json_lines(path: Path) -> Iterator[tuple[tuple[int, object], int, int]]:
    """Yield ((line number, parsed JSON value), undecodable bytes replaced, bytes of the file consumed so far)
    per non-blank line."""
    with open_input(path) as (raw, stream):
        for number, line in enumerate(stream, 1):
            if line.strip():
                text, bad = decode_utf8(line)
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{number} is not valid JSON ({err.msg}); JSON-lines input needs one "
                                    "object per line") from None
                yield (number, record), bad, raw.tell()


def record_text(record: object, field: str, path: Path, number: int, what: str, option: str) -> str:
    """record[field], or a UserError naming the file, the line and the option that chooses the field."""
    if not isinstance(record, dict) or field not in record:
        fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise UserError(f"{path}:{number} has no {what} field {field!r} (it has: {fields}); "
                        f"choose one with {option}")
    if not isinstance(record[field], str):
        raise UserError(f"{path}:{number}: the {what} field {field!r} holds {type(record[field]).__name__}, "
                        "expected a string")
    return record[field]


# ------------------------------------------------------------------------------------------ cleaned documents

class Doc(NamedTuple):
    """A cleaned document (or part of one) in the document store: UTF-8 bytes [offset, offset + nbytes)."""
    offset: int
    nbytes: int
    chars: int


class DocumentStore:
    """Cleaned documents appended to one UTF-8 file, so the corpus never has to fit in memory and encode
    workers read their own documents instead of receiving them through a pipe."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")
        self._size = 0

    def add(self, text: str) -> Doc:
        data = text.encode("utf-8")
        self._file.write(data)
        self._size += len(data)
        return Doc(self._size - len(data), len(data), len(text))

    def close(self) -> None:
        self._file.close()


def read_doc(file, doc: Doc) -> str:
    file.seek(doc.offset)
    return file.read(doc.nbytes).decode("utf-8")


def input_stats(unit: str) -> dict:
    """meta.json's "inputs", counted by read_files and the caller (`unit`: documents or JSON records read)."""
    return {"files": 0, "bytes": 0, unit: 0, "undecodable_bytes": 0, "files_with_undecodable_bytes": 0}


def read_files(files: Sequence[Path], read_file: Callable[[Path], Iterator[tuple[object, int, int]]],
               stats: dict) -> Iterator[tuple[Path, object]]:
    """(path, item) for the items read_file(path) yields as (item, undecodable bytes, bytes consumed), file by
    file, with a progress bar; counts files, bytes and undecodable bytes into stats. The caller may stop early."""
    with tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, desc="read+clean",
              file=sys.stderr, mininterval=0.5) as bar:
        for path in files:
            stats["files"] += 1
            consumed = bad_in_file = 0
            try:
                for item, bad, position in read_file(path):
                    bar.update(position - consumed)
                    stats["bytes"] += position - consumed
                    consumed = position
                    bad_in_file += bad
                    yield path, item
                rest = path.stat().st_size - consumed  # what follows the last item, e.g. blank lines
                bar.update(rest)
                stats["bytes"] += rest
            finally:
                stats["undecodable_bytes"] += bad_in_file
                stats["files_with_undecodable_bytes"] += bad_in_file > 0
                if bad_in_file:
                    tqdm.write(f"warning: {path}: {bad_in_file} undecodable bytes replaced by U+FFFD", file=sys.stderr)


def caps_reached(args: argparse.Namespace, kept: int, kept_chars: int) -> bool:
    return bool((args.max_docs and kept >= args.max_docs) or (args.max_chars and kept_chars >= args.max_chars))


def read_corpus(files: Sequence[Path], store: DocumentStore, cleaner: Cleaner,
                args: argparse.Namespace) -> tuple[list[Doc], list[bytes], dict]:
    """Read and clean every document into the store until the caps are reached."""
    docs: list[Doc] = []
    hashes: list[bytes] = []
    stats = input_stats("documents")
    kept_chars = 0
    with closing(read_files(files, lambda path: read_documents(path, args.jsonl_field), stats)) as texts:
        for _, text in texts:
            stats["documents"] += 1
            cleaned = cleaner(text)
            if cleaned is not None:
                docs.append(store.add(cleaned))
                hashes.append(document_hash(cleaned))
                kept_chars += len(cleaned)
            if caps_reached(args, len(docs), kept_chars):
                break
    return docs, hashes, stats


# ------------------------------------------------------------------------------------- fine-tuning examples

class Example(NamedTuple):
    """A prompt/response pair, both stored in the document store."""
    prompt: Doc
    response: Doc

    @property
    def nbytes(self) -> int:
        return self.prompt.nbytes + self.response.nbytes

    @property
    def chars(self) -> int:
        return self.prompt.chars + self.response.chars


def clean_sft_text(text: str, unicode_form: str) -> str:
    """The only cleaning safe for prompts and responses: one Unicode normal form and no control characters
    (tab, newline and carriage return stay). Whitespace and markup are kept as written."""
    return remove_control_chars(normalize_unicode(text, unicode_form))


def example_hash(prompt: str, response: str) -> bytes:
    """Content hash of an example, for deduplication and the split. NUL never survives cleaning, so it
    separates the two fields unambiguously."""
    return document_hash(f"{prompt}\0{response}")


def read_examples(files: Sequence[Path], store: DocumentStore,
                  args: argparse.Namespace) -> tuple[list[Example], list[bytes], dict, dict]:
    """Read every JSON-lines record's prompt and response into the store, cleaned and deduplicated, until the
    caps are reached (--max-docs counts examples). Returns examples, hashes, input stats and a cleaning report."""
    examples: list[Example] = []
    hashes: list[bytes] = []
    seen: set[bytes] = set()
    stats = input_stats("records")
    cleaning = {"changed": 0, "duplicates": 0}
    kept_chars = 0
    with closing(read_files(files, read_json_lines, stats)) as records:
        for path, (number, record) in records:
            stats["records"] += 1
            raw = [record_text(record, field, path, number, what, option) for field, what, option in (
                (args.prompt_field, "prompt", "--prompt-field"), (args.response_field, "response", "--response-field"))]
            prompt, response = (clean_sft_text(text, args.unicode_form) for text in raw)
            cleaning["changed"] += [prompt, response] != raw
            digest = example_hash(prompt, response)
            if digest in seen:
                cleaning["duplicates"] += 1
                continue
            seen.add(digest)
            examples.append(Example(store.add(prompt), store.add(response)))
            hashes.append(digest)
            kept_chars += len(prompt) + len(response)
            if caps_reached(args, len(examples), kept_chars):
                break
    return examples, hashes, stats, cleaning


# ---------------------------------------------------------------------------------------------------- split

def split_by_hash(items: list, hashes: list[bytes], val_fraction: float) -> tuple[list, list]:
    """(train, val): validation is the val_fraction of items with the smallest content hash, at least one
    when val_fraction > 0; independent of input order. Order within each split is kept."""
    n_val = max(1, round(len(items) * val_fraction)) if val_fraction > 0 else 0
    val_ids = set(sorted(range(len(items)), key=lambda i: (hashes[i], i))[:n_val])
    return ([x for i, x in enumerate(items) if i not in val_ids], [x for i, x in enumerate(items) if i in val_ids])


def split_corpus(docs: list[Doc], hashes: list[bytes], val_fraction: float,
                 store_path: Path) -> tuple[list[Doc], list[Doc], str]:
    """(train, val, method). With enough documents, split_by_hash; with few, validation is the last
    val_fraction of the concatenated text by characters, cutting one document in two (nanoGPT's convention)."""
    if len(docs) >= MIN_DOCS_FOR_DOCUMENT_SPLIT:
        return (*split_by_hash(docs, hashes, val_fraction), "documents")
    cut = int(sum(d.chars for d in docs) * (1 - val_fraction))
    train, val, seen = [], [], 0
    with open(store_path, "rb") as store:
        for doc in docs:
            if seen + doc.chars <= cut:
                train.append(doc)
            elif seen >= cut:
                val.append(doc)
            else:
                head = read_doc(store, doc)[:cut - seen]
                head_bytes = len(head.encode("utf-8"))
                train.append(Doc(doc.offset, head_bytes, len(head)))
                val.append(Doc(doc.offset + head_bytes, doc.nbytes - head_bytes, doc.chars - len(head)))
            seen += doc.chars
    return train, val, "characters"


# ------------------------------------------------------------------------------------------------ tokenizer

def sample_sentences(store_path: Path, docs: Sequence[Doc], max_sentences: int, seed: int = 0) -> list[str]:
    """A uniform random sample (reservoir sampling, fixed seed) of at most max_sentences line chunks."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    with open(store_path, "rb") as store:
        for doc in docs:
            for sentence in sentence_chunks(read_doc(store, doc), TOKENIZER_SENTENCE_CHARS):
                seen += 1
                if len(sample) < max_sentences:
                    sample.append(sentence)
                elif (j := rng.randrange(seen)) < max_sentences:
                    sample[j] = sentence
    return sample


def load_tokenizer(path: Path) -> Tokenizer:
    tokenizer = Tokenizer(path)
    if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
        raise UserError(f"--tokenizer {path} defines no bos/eos tokens (bos_id={tokenizer.bos_id}, "
                        f"eos_id={tokenizer.eos_id}); documents need both")
    return tokenizer


# --------------------------------------------------------------------------------------------------- encode

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
    context.set_forkserver_preload(["hvd_llama.prepare"])
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


def make_tokenizer(args: argparse.Namespace, store_path: Path, train: Sequence[Doc], path: Path) -> Tokenizer:
    """Copy --tokenizer, or train one on a sample of the training split (never on validation text)."""
    if args.tokenizer is not None:
        shutil.copyfile(args.tokenizer, path)
    else:
        sentences = sample_sentences(store_path, train, args.tokenizer_sentences)
        print(f"training a {args.vocab_size}-piece tokenizer on {len(sentences):,} text chunks", file=sys.stderr)
        train_tokenizer(sentences, path, args.vocab_size, args.tokenizer_sentences, TOKENIZER_SENTENCE_CHARS)
    return load_tokenizer(path)


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


# ---------------------------------------------------------------------------------------------- output folder

def check_out_dir(out: Path, overwrite: bool) -> None:
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


def publish(tmp: Path, out: Path) -> None:
    """Move the finished temp folder into place; an old corpus is replaced only after the new one is complete."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


# ------------------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hvd_llama.prepare", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Clean a text corpus (or, with --sft, read prompt/response examples), train a SentencePiece "
                    "BPE tokenizer and write memory-mappable token shards plus meta.json for hvd_llama.train.")
    files = parser.add_argument_group("input / output")
    files.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help=f"files or folders (plain text, source code, JSON lines; optionally .gz), or '{STDLIB}' "
                            "for this Python's standard library sources without tests (no download needed; write "
                            "./stdlib for a folder of that name)")
    files.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    files.add_argument("--overwrite", action="store_true", help="replace an existing prepared corpus in --out")
    files.add_argument("--include", nargs="+", default=argparse.SUPPRESS, metavar="GLOB",
                       help="file patterns read from folders, matched against the relative path and the name "
                            "(*.txt also matches a.txt.gz; hidden files and folders are skipped); default: "
                            f"{' '.join(DEFAULT_INCLUDE)}; with --sft: {' '.join(SFT_INCLUDE)}")
    files.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="file patterns skipped in folders")
    files.add_argument("--jsonl-field", default="text", help="field holding the text in JSON-lines records")
    files.add_argument("--max-docs", type=int, default=None,
                       help="stop after this many cleaned documents (--sft: examples)")
    files.add_argument("--max-chars", type=int, default=None, help="stop once this many cleaned characters are kept")
    sft = parser.add_argument_group(
        "supervised fine-tuning", "each example is stored as [bos] + prompt + response + [eos], with an index of "
        "where the response starts; cleaning is only --unicode-form and control characters (the --clean steps and "
        "--min-chars do not apply), and exact duplicates are dropped")
    sft.add_argument("--sft", action="store_true",
                     help="read every input file as JSON lines of prompt/response examples (optionally .gz)")
    sft.add_argument("--prompt-field", default="prompt", help="field holding the prompt in --sft records")
    sft.add_argument("--response-field", default="response", help="field holding the response in --sft records")
    clean = parser.add_argument_group("cleaning")
    clean.add_argument("--clean", default=",".join(DEFAULT_CLEAN),
                       help=f"comma-separated steps from {','.join(CLEAN_STEPS)}, or 'none'. html is off by "
                            "default because it would damage source code; use it for scraped web text")
    clean.add_argument("--unicode-form", choices=("NFC", "NFKC"), default="NFC", help="normal form of 'unicode'")
    clean.add_argument("--min-chars", type=int, default=32, help="'short' drops documents shorter than this")
    tok = parser.add_argument_group("tokenizer")
    choice = tok.add_mutually_exclusive_group()
    choice.add_argument("--vocab-size", type=int, default=4096, help="train a tokenizer of this many pieces")
    choice.add_argument("--tokenizer", type=Path, default=None, metavar="FILE",
                        help="use this existing SentencePiece tokenizer.model instead of training one")
    tok.add_argument("--tokenizer-sentences", type=int, default=100_000,
                     help=f"train on at most this many sampled chunks of <= {TOKENIZER_SENTENCE_CHARS} characters")
    out = parser.add_argument_group("split and shards")
    out.add_argument("--val-fraction", type=float, default=0.1,
                     help=f"held-out fraction: of the documents (those with the smallest content hash) when there "
                          f"are at least {MIN_DOCS_FOR_DOCUMENT_SPLIT}, else the last characters of the text; "
                          "--sft: of the examples by content hash, at least one")
    out.add_argument("--shard-tokens", type=int, default=100_000_000, help="at most this many tokens per shard")
    out.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    try:
        args.clean = parse_steps(args.clean)
    except ValueError as err:
        raise UserError(f"--clean: {err}") from None
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    for name in ("shard_tokens", "workers", "tokenizer_sentences", "max_docs", "max_chars"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value} must be at least 1")
    if args.min_chars < 0:
        raise UserError(f"--min-chars {args.min_chars} must be >= 0")
    if args.sft and args.prompt_field == args.response_field:
        raise UserError(f"--prompt-field and --response-field are both {args.prompt_field!r}; they must differ")
    if "include" not in vars(args):  # the default depends on --sft
        args.include = list(SFT_INCLUDE if args.sft else DEFAULT_INCLUDE)
    if args.tokenizer is not None:
        load_tokenizer(args.tokenizer)  # fail before reading the corpus


def prepare(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the whole pipeline for a command line; returns meta.json's content."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    validate_args(args)
    start_encoding_server(args.workers)
    out = args.out
    check_out_dir(out, args.overwrite)
    files = find_input_files(args.input, args.include, args.exclude)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        build = build_examples if args.sft else build_corpus
        meta = build(args, files, tmp, command=shlex.join(["python", "-m", "hvd_llama.prepare", *argv]))
        check_out_dir(out, args.overwrite)  # something may have appeared there meanwhile
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print_report(meta, out)
    return meta


def build_corpus(args: argparse.Namespace, files: Sequence[Path], folder: Path, command: str) -> dict:
    start = time.perf_counter()
    store = DocumentStore(folder / "documents.tmp")
    cleaner = Cleaner(args.clean, args.unicode_form, args.min_chars)
    try:
        docs, hashes, inputs = read_corpus(files, store, cleaner, args)
    finally:
        store.close()
    if not docs:
        dropped = ", ".join(f"{step}: {r['documents']}" for step, r in cleaner.report.items()
                            if r["documents"] and step not in CHAR_STEPS)
        raise UserError(f"the corpus is empty after cleaning: {inputs['documents']} documents read from "
                        f"{inputs['files']} files, all dropped ({dropped or 'no text'})")
    train, val, split_method = split_corpus(docs, hashes, args.val_fraction, store.path)
    if not train or (args.val_fraction > 0 and not val):
        raise UserError(f"the corpus ({sum(d.chars for d in docs)} characters) is too small to hold out "
                        f"--val-fraction {args.val_fraction}")

    tokenizer = make_tokenizer(args, store.path, train, folder / "tokenizer.model")
    dtype = token_dtype(tokenizer.vocab_size)
    splits = encode_splits({"train": train, "val": val}, tokenizer.path, store.path, dtype, folder,
                           args.shard_tokens, args.workers)
    store.path.unlink()
    return write_meta(folder, "pretrain", tokenizer, dtype, args, command, start,
                      split_method=split_method, val_fraction=args.val_fraction, splits=splits, inputs=inputs,
                      cleaning={"steps": list(args.clean), "unicode_form": args.unicode_form,
                                "min_chars": args.min_chars, "removed": cleaner.report})


def build_examples(args: argparse.Namespace, files: Sequence[Path], folder: Path, command: str) -> dict:
    """--sft: prompt/response examples -> shards, per-split example index, meta.json of kind "sft"."""
    start = time.perf_counter()
    store = DocumentStore(folder / "documents.tmp")
    try:
        examples, hashes, inputs, cleaning = read_examples(files, store, args)
    finally:
        store.close()
    if not examples:
        raise UserError(f"no fine-tuning examples in {inputs['files']} file(s) ({inputs['bytes']:,} bytes): --sft "
                        f"needs JSON lines with {args.prompt_field!r} and {args.response_field!r} fields")
    train, val = split_by_hash(examples, hashes, args.val_fraction)
    if not train:
        raise UserError(f"{len(examples)} example(s) are too few to hold out --val-fraction {args.val_fraction}; "
                        "add examples or use --val-fraction 0")

    tokenizer = make_tokenizer(args, store.path, [doc for example in train for doc in example],
                               folder / "tokenizer.model")
    dtype = token_dtype(tokenizer.vocab_size)
    splits = encode_example_splits({"train": train, "val": val}, tokenizer.path, store.path, dtype, folder,
                                   args.shard_tokens, args.workers)
    store.path.unlink()
    return write_meta(folder, "sft", tokenizer, dtype, args, command, start,
                      split_method="examples", val_fraction=args.val_fraction, splits=splits, inputs=inputs,
                      cleaning={"steps": ["unicode", "control"], "unicode_form": args.unicode_form, **cleaning},
                      sft={"prompt_field": args.prompt_field, "response_field": args.response_field})


def write_meta(folder: Path, kind: str, tokenizer: Tokenizer, dtype: np.dtype, args: argparse.Namespace,
               command: str, start: float, **fields) -> dict:
    """meta.json: what every data folder records, the builder's `fields`, then how it was made."""
    meta = {
        "format": META_FORMAT, "format_version": META_VERSION, "kind": kind,
        "vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
        "unk_id": tokenizer.unk_id, "tokenizer": tokenizer.path.name, "tokenizer_sha256": tokenizer.sha256,
        "tokenizer_trained": args.tokenizer is None,
        **fields,
        "command": command,
        "settings": json.loads(json.dumps(vars(args), default=str)),
        "python": platform.python_version(), "seconds": round(time.perf_counter() - start, 3),
    }
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def print_report(meta: dict, folder: Path) -> None:
    sft = meta["kind"] == "sft"
    unit = "examples" if sft else "documents"
    cleaning = meta["cleaning"]
    if sft:
        print(f"clean: {cleaning['changed']:,} examples changed ({cleaning['unicode_form']}, control characters), "
              f"{cleaning['duplicates']:,} duplicates dropped")
    else:
        for step, removed in cleaning["removed"].items():
            verb = "changed" if step in CHAR_STEPS else "dropped"
            print(f"clean {step}: {removed['documents']:,} documents {verb}, {removed['chars']:,} characters removed")
    inputs = meta["inputs"]
    if inputs["undecodable_bytes"]:
        print(f"warning: {inputs['undecodable_bytes']:,} undecodable bytes in {inputs['files_with_undecodable_bytes']} "
              "files were replaced by U+FFFD")
    for name, split in meta["splits"].items():
        tokens = (f"{split['prompt_tokens']:,} prompt + {split['response_tokens']:,} response tokens" if sft
                  else f"{split['tokens']:,} tokens")
        print(f"{name}: {split[unit]:,} {unit}, {split['chars']:,} characters, {tokens}, "
              f"{len(split['shards'])} shard file(s)")
    count = sum(s[unit] for s in meta["splits"].values())
    chars = sum(s["chars"] for s in meta["splits"].values())
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    seconds = max(meta["seconds"], 1e-3)
    print(f"prepared {count:,} {unit}, {chars:,} characters -> {tokens:,} tokens "
          f"({chars / tokens:.2f} characters/token) in {seconds:.1f} s "
          f"({inputs['bytes'] / 1e6 / seconds:.2f} MB/s) -> {folder}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(prepare, argv)


if __name__ == "__main__":
    main()
