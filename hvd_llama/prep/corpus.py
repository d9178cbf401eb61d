"""Finding and reading inputs: files, folders, the standard library, plain text and JSON lines (optionally .gz),
read and cleaned into a document store, then split into train and validation by content hash."""
from __future__ import annotations

import argparse
import fnmatch
import gzip
import json
import sys
import sysconfig
import zlib
from contextlib import closing, contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, NamedTuple, Sequence

from tqdm import tqdm

from hvd_llama.cli import UserError
from hvd_llama.prep.text import Cleaner, decode_utf8, document_hash, normalize_unicode, remove_control_chars

STDLIB = "stdlib"
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
SFT_INCLUDE = ("*.jsonl", "*.ndjson")
DEFAULT_INCLUDE = ("*.txt", "*.md", "*.rst", "*.jsonl", "*.ndjson", "*.py", "*.pyi", "*.c", "*.h", "*.cc",
                   "*.cpp", "*.hpp", "*.cu", "*.java", "*.js", "*.ts", "*.go", "*.rs", "*.rb", "*.sh", "*.toml",
                   "*.yaml", "*.yml", "*.tex")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
MIN_DOCS_FOR_DOCUMENT_SPLIT = 20  # fewer documents are split by characters (nanoGPT's tiny Shakespeare rule)


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

