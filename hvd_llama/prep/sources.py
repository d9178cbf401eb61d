"""The input: finding files (folders, globs, the standard library), cutting them into pieces and the pieces into
parts of about --part-mb each (the units the ranks share out), and reading a piece's records.

Formats: plain text and source code (one document per file), JSON lines (one record per line) and Parquet (one
record per row, the requested columns only), text and JSON lines optionally gzip- or zstandard-compressed (.gz,
.zst). A piece is a whole file, a byte range of a large uncompressed JSON-lines file (lines are read by where they
start, so each line belongs to exactly one range) or one row group of a Parquet file. How a corpus is cut depends
on its files and --part-mb only, never on the number of ranks: that is what makes the output independent of it.
"""
from __future__ import annotations

import fnmatch
import gzip
import io
import json
import sysconfig
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple, Sequence

from hvd_llama.cli import UserError
from hvd_llama.prep.text import decode_utf8

STDLIB = "stdlib"
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
COMPRESSED = (".gz", ".zst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIX = ".parquet"
SFT_INCLUDE = ("*.jsonl", "*.ndjson", "*.parquet")
DEFAULT_INCLUDE = ("*.txt", "*.md", "*.rst", "*.jsonl", "*.ndjson", "*.parquet", "*.py", "*.pyi", "*.c", "*.h",
                   "*.cc", "*.cpp", "*.hpp", "*.cu", "*.java", "*.js", "*.ts", "*.go", "*.rs", "*.rb", "*.sh",
                   "*.toml", "*.yaml", "*.yml", "*.tex")
READ_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------------- input files

def uncompressed_name(name: str) -> str:
    """a.jsonl.zst -> a.jsonl; names without a compression suffix stay as they are."""
    return next((name[:-len(s)] for s in COMPRESSED if name.endswith(s)), name)


def stdlib_files() -> list[Path]:
    """The running Python's standard library sources, without tests and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted((p for p in root.rglob("*.py") if not STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1])),
                  key=lambda p: p.relative_to(root).as_posix())


def _matches(relative: str, patterns: Sequence[str]) -> bool:
    name = relative.rsplit("/", 1)[-1]
    names = (relative, name, uncompressed_name(name))  # *.txt also matches a.txt.gz and a.txt.zst
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


# ------------------------------------------------------------------------------------------- pieces and parts

class Piece(NamedTuple):
    """What one reader reads: [start, stop) in bytes (text, JSON lines) or row groups (Parquet) of a file."""
    path: str
    kind: str  # "text", "jsonl" or "parquet"
    start: int
    stop: int
    size: int  # bytes of the file it covers (compressed, as stored)
    first: bool  # the file's first piece: counts the file once


def file_kind(path: Path, records_only: bool = False) -> str:
    """parquet, jsonl, or text (one document per file), by the name; `records_only` (fine-tuning examples)
    reads every file that is not Parquet as JSON lines."""
    name = uncompressed_name(path.name)
    if name.endswith(PARQUET_SUFFIX):
        if name != path.name:
            raise UserError(f"{path}: Parquet files compress their columns themselves; expected a plain .parquet file")
        return "parquet"
    return "jsonl" if records_only or name.endswith(JSONL_SUFFIXES) else "text"


def parquet_file(path: Path):
    import pyarrow.parquet as pq  # only for Parquet input: pyarrow takes a while to import

    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as err:  # pyarrow.ArrowInvalid is a ValueError
        raise UserError(f"{path} is not a valid Parquet file ({err})") from None


def row_group_bytes(metadata, group: int) -> int:
    row_group = metadata.row_group(group)
    return sum(row_group.column(c).total_compressed_size for c in range(row_group.num_columns))


def file_pieces(path: Path, part_bytes: int, records_only: bool = False) -> list[Piece]:
    """A file cut into pieces: Parquet row groups, byte ranges of at most part_bytes of an uncompressed
    JSON-lines file, else the whole file."""
    kind, size = file_kind(path, records_only), path.stat().st_size
    if kind == "parquet":
        metadata = parquet_file(path).metadata
        return [Piece(str(path), kind, g, g + 1, row_group_bytes(metadata, g), g == 0)
                for g in range(metadata.num_row_groups)]
    if kind == "jsonl" and not path.name.endswith(COMPRESSED):
        starts = range(0, max(size, 1), part_bytes)
        return [Piece(str(path), kind, a, min(a + part_bytes, size), min(part_bytes, size - a), a == 0)
                for a in starts]
    return [Piece(str(path), kind, 0, size, size, True)]


def plan_parts(files: Sequence[Path], part_bytes: int, records_only: bool = False) -> list[list[Piece]]:
    """The files' pieces in order, grouped greedily into parts of at most part_bytes (a larger piece is a part
    of its own)."""
    parts: list[list[Piece]] = [[]]
    size = 0
    for path in files:
        for piece in file_pieces(path, part_bytes, records_only):
            if parts[-1] and size + piece.size > part_bytes:
                parts.append([])
                size = 0
            parts[-1].append(piece)
            size += piece.size
    return [p for p in parts if p]


# ---------------------------------------------------------------------------------------------------- reading

class Record(NamedTuple):
    """One thing a piece holds: the text of a text file, or a JSON-lines / Parquet record (a dict), with the
    undecodable bytes decoding replaced, how many bytes of the piece are consumed so far, and where it is
    (a line or row number, for messages)."""
    value: object
    bad: int
    position: int
    number: int


class _ZstdStream(io.RawIOBase):
    """The decompressed bytes of a zstandard file of one or more frames. A truncated last frame is an error
    (zstandard's own stream reader ends quietly there)."""

    def __init__(self, raw: BinaryIO, path: Path):
        import zstandard

        self.raw, self.path, self.error = raw, path, zstandard.ZstdError
        self.context, self.frame, self.pending, self.buffer = zstandard.ZstdDecompressor(), None, b"", b""

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while not self.buffer:
            data, self.pending = self.pending or self.raw.read(READ_CHUNK), b""
            if not data:
                if self.frame is not None and not self.frame.eof:
                    raise UserError(f"{self.path} is not a valid zstandard file (its last frame is truncated)")
                return 0
            if self.frame is None or self.frame.eof:
                self.frame = self.context.decompressobj()
            try:
                self.buffer = self.frame.decompress(data)
            except self.error as err:
                raise UserError(f"{self.path} is not a valid zstandard file ({err})") from None
            if self.frame.eof:
                self.pending = self.frame.unused_data
        n = min(len(target), len(self.buffer))
        target[:n], self.buffer = self.buffer[:n], self.buffer[n:]
        return n


@contextmanager
def open_input(path: Path) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """(raw file, decompressed stream) of an input file that may be gzip- (.gz) or zstandard-compressed (.zst)."""
    with open(path, "rb") as raw:
        if path.name.endswith(".zst"):
            yield raw, io.BufferedReader(_ZstdStream(raw, path), READ_CHUNK)
            return
        try:
            yield raw, gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise UserError(f"{path} is not a valid gzip file ({err})") from None


def read_piece(piece: Piece, columns: dict[str, str]) -> Iterator[Record]:
    """The records of a piece: a text file's whole text, a JSON-lines line's parsed value, or a Parquet row's
    `columns` (a dict; `columns` maps each to the option that names it, for messages)."""
    path = Path(piece.path)
    if piece.kind == "parquet":
        yield from _parquet_rows(path, piece, columns)
    elif piece.kind == "jsonl":
        yield from _json_lines(path, piece)
    else:
        with open_input(path) as (raw, stream):
            text, bad = decode_utf8(stream.read())
            yield Record(text, bad, raw.tell(), 1)


def _json_lines(path: Path, piece: Piece) -> Iterator[Record]:
    """The lines that start in [piece.start, piece.stop): a line across the end belongs to this piece, one
    across the start to the piece before. A compressed file is one piece, read to its end."""
    with open_input(path) as (raw, stream):
        begin = _first_line(raw, piece.start)
        number = 0
        while stream is not raw or raw.tell() < piece.stop:
            line = stream.readline()
            if not line:
                break
            number += 1
            if line.strip():
                text, bad = decode_utf8(line)
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    raise UserError(f"{location(piece, number)} is not valid JSON ({err.msg}); JSON-lines input "
                                    "needs one object per line") from None
                yield Record(record, bad, raw.tell() - begin, number)


def _first_line(raw: BinaryIO, start: int) -> int:
    """Move to the first line that starts at or after `start`; returns its offset."""
    if start:
        raw.seek(start - 1)
        raw.readline()  # the rest of a line that started before `start` (just its newline if one ends there)
    return raw.tell()


def _parquet_rows(path: Path, piece: Piece, columns: dict[str, str]) -> Iterator[Record]:
    """Rows of the piece's row groups, a batch at a time (never a whole file in memory); nulls read as empty
    text. Progress counts a row group as read from its first row on."""
    import pyarrow as pa

    parquet = parquet_file(path)
    schema = parquet.schema_arrow
    for column, option in columns.items():
        if column not in schema.names:
            raise UserError(f"{path} has no column {column!r} (it has: {', '.join(schema.names)}); choose one "
                            f"with {option}")
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"{path}: column {column!r} holds {kind}, expected strings")
    metadata = parquet.metadata
    number = sum(metadata.row_group(g).num_rows for g in range(piece.start))
    position = 0
    for group in range(piece.start, piece.stop):
        position += row_group_bytes(metadata, group)
        for batch in parquet.iter_batches(batch_size=1024, row_groups=[group], columns=list(columns)):
            for values in zip(*(batch.column(c).to_pylist() for c in columns)):
                number += 1
                yield Record({c: v or "" for c, v in zip(columns, values)}, 0, position, number)


def location(piece: Piece, number: int) -> str:
    """Where a record is, for messages: path:line of a JSON-lines record (the lines before a piece that starts
    inside the file are counted only now), or path row N of a Parquet row."""
    if piece.kind == "parquet":
        return f"{piece.path} row {number}"
    with open(piece.path, "rb") as f:
        remaining = _first_line(f, piece.start)
        f.seek(0)
        while remaining > 0:
            chunk = f.read(min(READ_CHUNK, remaining))
            number += chunk.count(b"\n")
            remaining -= len(chunk)
    return f"{piece.path}:{number}"


def record_text(record: Record, piece: Piece, field: str, what: str, option: str) -> str:
    """record.value[field], or a UserError naming where the record is (worked out only then: it can mean reading
    the file up to the piece) and the option that chooses the field."""
    value = record.value
    if not isinstance(value, dict) or field not in value:
        fields = ", ".join(value) if isinstance(value, dict) else type(value).__name__
        raise UserError(f"{location(piece, record.number)} has no {what} field {field!r} (it has: {fields}); choose "
                        f"one with {option}")
    if not isinstance(value[field], str):
        raise UserError(f"{location(piece, record.number)}: the {what} field {field!r} holds "
                        f"{type(value[field]).__name__}, expected a string")
    return value[field]
