"""Turn raw text into token shards: read, clean, split, train a tokenizer, encode in parallel, write.

    python -m hvd_llama.prepare --input stdlib --out data/stdlib

writes DIR/{tokenizer.model, meta.json, train_0000.bin ..., val_0000.bin ...}. Everything is written into a
temporary folder next to DIR and renamed at the end, so DIR is either complete or untouched.

Shard file (little-endian, llm.c style): a 1024-byte header of 128 int64 [magic b"HVDLLAMA", format
version, bytes per token (2: uint16, 4: uint32), token count, 0 ...], then the tokens. Each document is
stored as [bos] + tokens + [eos]; documents are packed back to back, and a split may span several shards.
"""
from __future__ import annotations

import argparse
import fnmatch
import gzip
import json
import multiprocessing
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
from contextlib import closing
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
from tqdm import tqdm

from hvd_llama.cli import UserError, atomic_write_text, run_main, sha256_file
from hvd_llama.text import (CHAR_STEPS, CLEAN_STEPS, DEFAULT_CLEAN, Cleaner, decode_utf8, document_hash, parse_steps,
                            sentence_chunks)
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


def read_documents(path: Path, jsonl_field: str) -> Iterator[tuple[str, int, int]]:
    """Yield (text, undecodable bytes replaced, bytes of the file consumed so far) per document: one per
    plain-text file, one per line of a JSON-lines file; either may be gzip-compressed (.gz)."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        try:
            if name.endswith(JSONL_SUFFIXES):
                for number, line in enumerate(stream, 1):
                    if line.strip():
                        text, bad = decode_utf8(line)
                        yield _jsonl_text(text, jsonl_field, path, number), bad, raw.tell()
            else:
                text, bad = decode_utf8(stream.read())
                yield text, bad, raw.tell()
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise UserError(f"{path} is not a valid gzip file ({err})") from None


def _jsonl_text(line: str, field: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{number} is not valid JSON ({err.msg}); JSON-lines input needs one object "
                        "per line") from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise UserError(f"{path}:{number} has no text field {field!r} (it has: {fields}); "
                        "choose one with --jsonl-field")
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


def read_corpus(files: Sequence[Path], store: DocumentStore, cleaner: Cleaner, jsonl_field: str,
                max_docs: Optional[int], max_chars: Optional[int]) -> tuple[list[Doc], list[bytes], dict]:
    """Read and clean every document into the store until the caps are reached."""
    docs: list[Doc] = []
    hashes: list[bytes] = []
    stats = {"files": 0, "bytes": 0, "documents": 0, "undecodable_bytes": 0, "files_with_undecodable_bytes": 0}
    kept_chars = 0
    with tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, desc="read+clean",
              file=sys.stderr, mininterval=0.5) as bar:
        for path in files:
            consumed = bad_in_file = 0
            for text, bad, position in read_documents(path, jsonl_field):
                bar.update(position - consumed)
                consumed = position
                stats["documents"] += 1
                bad_in_file += bad
                cleaned = cleaner(text)
                if cleaned is not None:
                    docs.append(store.add(cleaned))
                    hashes.append(document_hash(cleaned))
                    kept_chars += len(cleaned)
                if (max_docs and len(docs) >= max_docs) or (max_chars and kept_chars >= max_chars):
                    break
            stats["files"] += 1
            stats["bytes"] += consumed
            stats["undecodable_bytes"] += bad_in_file
            stats["files_with_undecodable_bytes"] += bad_in_file > 0
            if bad_in_file:
                tqdm.write(f"warning: {path}: {bad_in_file} undecodable bytes replaced by U+FFFD", file=sys.stderr)
            if (max_docs and len(docs) >= max_docs) or (max_chars and kept_chars >= max_chars):
                break
    return docs, hashes, stats


# ---------------------------------------------------------------------------------------------------- split

def split_corpus(docs: list[Doc], hashes: list[bytes], val_fraction: float,
                 store_path: Path) -> tuple[list[Doc], list[Doc], str]:
    """(train, val, method). With enough documents, validation is the val_fraction of documents with the
    smallest content hash (independent of input order); with few, it is the last val_fraction of the
    concatenated text by characters, cutting one document in two (nanoGPT's convention)."""
    if len(docs) >= MIN_DOCS_FOR_DOCUMENT_SPLIT:
        n_val = max(1, round(len(docs) * val_fraction)) if val_fraction > 0 else 0
        val_ids = set(sorted(range(len(docs)), key=lambda i: (hashes[i], i))[:n_val])
        train = [d for i, d in enumerate(docs) if i not in val_ids]
        val = [d for i, d in enumerate(docs) if i in val_ids]
        return train, val, "documents"
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
        encoded = self.sp.encode([read_doc(self.store, d) for d in docs], num_threads=1)
        bos, eos = self.sp.bos_id(), self.sp.eos_id()
        flat: list[int] = []
        for ids in encoded:
            flat.append(bos)
            flat.extend(ids)
            flat.append(eos)
        return np.array(flat, dtype=self.dtype)


_worker_encoder: Optional[DocEncoder] = None


def _start_worker(*encoder_args) -> None:
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it terminates the pool
    _worker_encoder = DocEncoder(*encoder_args)


def _encode_in_worker(docs: Sequence[Doc]) -> np.ndarray:
    return _worker_encoder(docs)


def batch_docs(docs: Sequence[Doc], batch_bytes: int) -> list[list[Doc]]:
    """Consecutive documents grouped into batches of about batch_bytes each (order kept)."""
    batches: list[list[Doc]] = [[]]
    size = 0
    for doc in docs:
        if batches[-1] and size + doc.nbytes > batch_bytes:
            batches.append([])
            size = 0
        batches[-1].append(doc)
        size += doc.nbytes
    return [b for b in batches if b]


def encode_batches(batches: Sequence[Sequence[Doc]], tokenizer_path: Path, store_path: Path, dtype: np.dtype,
                   workers: int) -> Iterator[np.ndarray]:
    """Token arrays for `batches`, in order. workers > 1 encodes in a process pool (imap keeps the order, and
    tasks are only document offsets, so memory stays bounded); workers == 1 encodes in this process.
    Also the benchmark's entry point for single-process versus parallel encoding."""
    args = (tokenizer_path, store_path, dtype)
    if workers <= 1 or len(batches) <= 1:
        yield from map(DocEncoder(*args), batches)
        return
    with multiprocessing.get_context("spawn").Pool(workers, _start_worker, args) as pool:
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


def encode_splits(split_docs: dict[str, list[Doc]], tokenizer_path: Path, store_path: Path, dtype: np.dtype,
                  folder: Path, shard_tokens: int, workers: int) -> dict:
    """Encode every split into its shards; returns meta.json's "splits"."""
    batches = [(name, batch) for name, docs in split_docs.items() for batch in batch_docs(docs, ENCODE_BATCH_BYTES)]
    writers = {name: ShardWriter(folder, name, dtype, shard_tokens) for name in split_docs}
    with tqdm(total=sum(d.nbytes for docs in split_docs.values() for d in docs), unit="B", unit_scale=True,
              desc="encode", file=sys.stderr, mininterval=0.5) as bar:
        arrays = encode_batches([b for _, b in batches], tokenizer_path, store_path, dtype, workers)
        with closing(arrays):  # on an error, stop the pool now rather than when garbage-collected
            for (name, batch), tokens in zip(batches, arrays):
                writers[name].write(tokens)
                bar.update(sum(d.nbytes for d in batch))
    splits = {}
    for name, docs in split_docs.items():
        shards = writers[name].close()
        splits[name] = {"documents": len(docs), "chars": sum(d.chars for d in docs),
                        "tokens": sum(s["tokens"] for s in shards), "shards": shards}
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
        description="Clean a text corpus, train a SentencePiece BPE tokenizer and write memory-mappable token "
                    "shards plus meta.json for hvd_llama.train.")
    files = parser.add_argument_group("input / output")
    files.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help=f"files or folders (plain text, source code, JSON lines; optionally .gz), or '{STDLIB}' "
                            "for this Python's standard library sources without tests (no download needed; write "
                            "./stdlib for a folder of that name)")
    files.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    files.add_argument("--overwrite", action="store_true", help="replace an existing prepared corpus in --out")
    files.add_argument("--include", nargs="+", default=list(DEFAULT_INCLUDE), metavar="GLOB",
                       help="file patterns read from folders, matched against the relative path and the name "
                            "(*.txt also matches a.txt.gz; hidden files and folders are skipped)")
    files.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="file patterns skipped in folders")
    files.add_argument("--jsonl-field", default="text", help="field holding the text in JSON-lines records")
    files.add_argument("--max-docs", type=int, default=None, help="stop after this many cleaned documents")
    files.add_argument("--max-chars", type=int, default=None, help="stop once this many cleaned characters are kept")
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
                          f"are at least {MIN_DOCS_FOR_DOCUMENT_SPLIT}, else the last characters of the text")
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
    if args.tokenizer is not None:
        load_tokenizer(args.tokenizer)  # fail before reading the corpus


def prepare(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the whole pipeline for a command line; returns meta.json's content."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    validate_args(args)
    out = args.out
    check_out_dir(out, args.overwrite)
    files = find_input_files(args.input, args.include, args.exclude)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        meta = build_corpus(args, files, tmp, command=shlex.join(["python", "-m", "hvd_llama.prepare", *argv]))
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
        docs, hashes, inputs = read_corpus(files, store, cleaner, args.jsonl_field, args.max_docs, args.max_chars)
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

    seconds = time.perf_counter() - start
    meta = {
        "format": META_FORMAT, "format_version": META_VERSION,
        "vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
        "unk_id": tokenizer.unk_id, "tokenizer": tokenizer.path.name, "tokenizer_sha256": tokenizer.sha256,
        "tokenizer_trained": args.tokenizer is None,
        "split_method": split_method, "val_fraction": args.val_fraction, "splits": splits,
        "inputs": inputs,
        "cleaning": {"steps": list(args.clean), "unicode_form": args.unicode_form, "min_chars": args.min_chars,
                     "removed": cleaner.report},
        "command": command,
        "settings": json.loads(json.dumps(vars(args), default=str)),
        "python": platform.python_version(), "seconds": round(seconds, 3),
    }
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def print_report(meta: dict, folder: Path) -> None:
    for step, removed in meta["cleaning"]["removed"].items():
        verb = "changed" if step in CHAR_STEPS else "dropped"
        print(f"clean {step}: {removed['documents']:,} documents {verb}, {removed['chars']:,} characters removed")
    inputs = meta["inputs"]
    if inputs["undecodable_bytes"]:
        print(f"warning: {inputs['undecodable_bytes']:,} undecodable bytes in {inputs['files_with_undecodable_bytes']} "
              "files were replaced by U+FFFD")
    for name, split in meta["splits"].items():
        print(f"{name}: {split['documents']:,} documents, {split['chars']:,} characters, {split['tokens']:,} tokens, "
              f"{len(split['shards'])} shard file(s)")
    docs = sum(s["documents"] for s in meta["splits"].values())
    chars = sum(s["chars"] for s in meta["splits"].values())
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    seconds = meta["seconds"]
    print(f"prepared {docs:,} documents, {chars:,} characters -> {tokens:,} tokens "
          f"({chars / tokens:.2f} characters/token) in {seconds:.1f} s "
          f"({inputs['bytes'] / 1e6 / seconds:.2f} MB/s) -> {folder}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(prepare, argv)


if __name__ == "__main__":
    main()
