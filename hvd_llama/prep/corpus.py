"""Reading one part of the input (sources.py) into cleaned documents on disk: the part's text store and its table
of documents, which deduplication, the split, the tokenizer's sample and encoding read back by row. Memory holds
one document (or the text column of one Parquet row group) and 56 bytes per document of the part, whatever the
corpus.

A part's folder holds
    store.bin   the cleaned texts back to back (UTF-8); a fine-tuning example is its prompt, then its response
    table.npy   uint64 [7, documents]: the content hash as two big-endian halves (hi, lo), where the document starts
                in the store, its bytes and characters, and for an example its prompt's bytes and characters (0 for
                a document)
    hashes.npy  uint64 [4, documents]: hi, lo, the document's row and its characters, sorted by (hi, lo, row): a
                deduplication bucket reads its slice of hashes from every part
    read.json   the marker: what was read, what cleaning changed, the documents kept, where a cap stopped reading
"""
from __future__ import annotations

from array import array
from contextlib import closing
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from hvd_llama.prep.settings import InputOptions, PrepareOptions
from hvd_llama.prep.sources import Piece, Record, file_pieces, read_piece, record_text
from hvd_llama.prep.staging import HashingFile
from hvd_llama.prep.text import Cleaner, document_hash, normalize_unicode, remove_control_chars
from hvd_llama.procs import say

TABLE_ROWS = ("hi", "lo", "offset", "nbytes", "chars", "head_nbytes", "head_chars")
HI, LO, OFFSET, NBYTES, CHARS, HEAD_NBYTES, HEAD_CHARS = range(len(TABLE_ROWS))
STORE, TABLE, HASHES, READ = "store.bin", "table.npy", "hashes.npy", "read.json"


def hash_halves(digest: bytes) -> tuple[int, int]:
    """A 16-byte hash as two integers that order as the bytes do."""
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big")


def save_array(path: Path, values: np.ndarray) -> dict[Path, dict]:
    file = HashingFile(path)
    np.save(file, values, allow_pickle=False)
    return {path: file.close()}


class PartWriter:
    """Appends cleaned documents (or examples) to a part's store and table."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.store = HashingFile(folder / STORE)
        self.rows = [array("Q") for _ in TABLE_ROWS]

    def __len__(self) -> int:
        return len(self.rows[0])

    def add(self, texts: Sequence[str], digest: bytes) -> None:
        data = [text.encode("utf-8") for text in texts]
        offset = self.store.size
        for chunk in data:
            self.store.write(chunk)
        head = (len(data[0]), len(texts[0])) if len(texts) > 1 else (0, 0)
        values = (*hash_halves(digest), offset, sum(map(len, data)), sum(map(len, texts)), *head)
        for row, value in zip(self.rows, values):
            row.append(value)

    def close(self) -> dict[Path, dict]:
        """Write the table and the sorted hashes; returns the part's files for its marker."""
        table = np.stack([np.frombuffer(row, dtype=np.uint64) if len(row) else np.zeros(0, np.uint64)
                          for row in self.rows])
        order = np.lexsort((table[LO], table[HI]))  # stable: rows of one hash stay in reading order
        hashes = np.stack([table[HI][order], table[LO][order], order.astype(np.uint64), table[CHARS][order]])
        return {self.store.path: self.store.close(), **save_array(self.folder / TABLE, table),
                **save_array(self.folder / HASHES, hashes)}


def read_table(folder: Path) -> np.ndarray:
    return np.load(folder / TABLE, mmap_mode="r")


def read_hashes(folder: Path) -> np.ndarray:
    return np.load(folder / HASHES, mmap_mode="r")


def read_texts(store, table: np.ndarray, row: int, examples: bool) -> list[str]:
    """A row's texts from an open store: [document], or [prompt, response] of an example."""
    store.seek(int(table[OFFSET, row]))
    data = store.read(int(table[NBYTES, row]))
    head = int(table[HEAD_NBYTES, row])
    return [data[:head].decode("utf-8"), data[head:].decode("utf-8")] if examples else [data.decode("utf-8")]


# --------------------------------------------------------------------------------------------------- the caps

class Caps:
    """--max-docs / --max-chars on one rank, counting distinct documents (when deduplicating) in the order the
    rank reads them. A rank sees a subset of the documents before any point of the corpus, so when its count
    reaches a cap the whole corpus's count has reached it by then too: the rank may stop reading there, and the
    exact cut is made later over every part (split.py). Holds the hashes it has counted, so at most a cap's worth."""

    def __init__(self, inputs: InputOptions, distinct: bool):
        self.max_docs, self.max_chars = inputs.max_docs, inputs.max_chars
        self.seen: Optional[set] = set() if distinct else None
        self.docs = self.chars = 0

    @property
    def active(self) -> bool:
        return bool(self.max_docs or self.max_chars)

    def add(self, digest: object, chars: int) -> bool:
        """Count a kept document; True once a cap is reached."""
        if self.seen is None or digest not in self.seen:
            if self.seen is not None:
                self.seen.add(digest)
            self.docs += 1
            self.chars += chars
        return bool((self.max_docs and self.docs >= self.max_docs) or (self.max_chars and self.chars >= self.max_chars))

    def add_part(self, folder: Path) -> Optional[int]:
        """Count the documents of a part read before (a resumed run); the row where a cap is reached, if it is."""
        table = read_table(folder)
        for row, (hi, lo, chars) in enumerate(zip(table[HI].tolist(), table[LO].tolist(), table[CHARS].tolist())):
            if self.add((hi, lo), chars):
                return row
        return None


# ------------------------------------------------------------------------------------------------ reading a part

def document_text(piece: Piece, record: Record, field: str) -> str:
    """A record's document: the record itself in a text file, its `field` (--text-field) in JSON lines or Parquet."""
    return record.value if piece.kind == "text" else record_text(record, piece, field, "text", "--text-field")


def read_documents(path: Path, text_field: str) -> Iterator[tuple[str, int, int]]:
    """(text, undecodable bytes replaced, bytes of its piece consumed) of each document of one file, uncleaned:
    what `evaluate --text` scores."""
    for piece in file_pieces(path, 1 << 62):
        for record in read_piece(piece, {text_field: "--text-field"}):
            yield document_text(piece, record, text_field), record.bad, record.position


def input_stats(unit: str) -> dict:
    """meta.json's "inputs" (`unit`: documents or JSON records read)."""
    return {"files": 0, "bytes": 0, unit: 0, "undecodable_bytes": 0, "files_with_undecodable_bytes": 0}


def read_records(pieces: Sequence[Piece], columns: dict[str, str], stats: dict,
                 progress: Callable[[int], object]) -> Iterator[tuple[Piece, Record]]:
    """Every record of the pieces, counting files, bytes and undecodable bytes into stats as it goes."""
    for piece in pieces:
        stats["files"] += piece.first
        consumed = bad = 0
        try:
            for record in read_piece(piece, columns):
                progress(record.position - consumed)
                stats["bytes"] += record.position - consumed
                consumed, bad = record.position, bad + record.bad
                yield piece, record
            progress(piece.size - consumed)  # what follows the last record, e.g. blank lines
            stats["bytes"] += piece.size - consumed
        finally:
            stats["undecodable_bytes"] += bad
            stats["files_with_undecodable_bytes"] += bad > 0
            if bad:
                say(f"warning: {piece.path}: {bad} undecodable bytes replaced by U+FFFD")


class Documents:
    """Pretraining documents: a text file's text or a record's text field, cleaned."""

    unit = "documents"

    def __init__(self, options: PrepareOptions):
        c = options.clean
        self.cleaner, self.field = Cleaner(c.steps, c.unicode_form, c.min_chars), options.inputs.text_field

    def texts(self, piece: Piece, record: Record) -> Optional[tuple[list[str], bytes]]:
        cleaned = self.cleaner(document_text(piece, record, self.field))
        return None if cleaned is None else ([cleaned], document_hash(cleaned))

    def report(self) -> dict:
        return self.cleaner.report


def clean_sft_text(text: str, unicode_form: str) -> str:
    """The only cleaning safe for prompts and responses: one Unicode normal form and no control characters
    (tab, newline and carriage return stay). Whitespace and markup are kept as written."""
    return remove_control_chars(normalize_unicode(text, unicode_form))


def example_hash(prompt: str, response: str) -> bytes:
    """Content hash of an example, for deduplication and the split. NUL never survives cleaning, so it
    separates the two fields unambiguously."""
    return document_hash(f"{prompt}\0{response}")


class Examples:
    """Fine-tuning examples: each record's prompt and response, cleaned of control characters only."""

    unit = "records"

    def __init__(self, options: PrepareOptions):
        self.fields = [(options.sft.prompt_field, "prompt", "--prompt-field"),
                       (options.sft.response_field, "response", "--response-field")]
        self.unicode_form = options.clean.unicode_form
        self.changed = 0

    def texts(self, piece: Piece, record: Record) -> tuple[list[str], bytes]:
        raw = [record_text(record, piece, field, what, option) for field, what, option in self.fields]
        cleaned = [clean_sft_text(text, self.unicode_form) for text in raw]
        self.changed += cleaned != raw
        return cleaned, example_hash(*cleaned)

    def report(self) -> dict:
        return {"changed": self.changed}


def read_part(pieces: Sequence[Piece], folder: Path, options: PrepareOptions, caps: Caps,
              progress: Callable[[int], object]) -> tuple[dict, dict[Path, dict]]:
    """Read and clean a part into its folder; returns its marker's content and its files. Reading stops at the
    document that makes this rank's count reach a cap ("stop": its row)."""
    reader = Examples(options) if options.sft else Documents(options)
    writer = PartWriter(folder)
    stats = input_stats(reader.unit)
    stop = None
    with closing(read_records(pieces, options.columns(), stats, progress)) as records:
        for piece, record in records:
            stats[reader.unit] += 1
            kept = reader.texts(piece, record)
            if kept is not None:
                writer.add(*kept)
                if caps.active and caps.add(hash_halves(kept[1]), sum(map(len, kept[0]))):
                    stop = len(writer) - 1
                    break
    content = {"inputs": stats, "cleaning": reader.report(), "documents": len(writer), "stop": stop}
    return content, writer.close()
