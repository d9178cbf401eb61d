"""Exact deduplication in bounded memory, partitioned by hash.

Every part's hashes are sorted (corpus.py), so the documents whose hash falls in a range are one slice of each
part's hashes. The hash space is cut into equal ranges, buckets, as many as it takes for one bucket's table to fit
in --memory-mb, and the ranks share the buckets out (through the staging folder: nothing but counts passes
through collectives). A bucket holds every copy of each of its hashes, so deduplicating it alone is exact: of
equal documents the first in the corpus's order, (part, row), is kept, whichever rank read it. A bucket writes

    PREFIX.drops.npy  uint64 [n]: the keys (part << 40 | row) of the copies dropped, sorted: each part looks up its own
    PREFIX.kept.npy   uint64 [4, k]: hi, lo, key and characters of the documents kept, in hash order: what the
                      validation split and the tokenizer's sample are chosen from (split.py)
    PREFIX.json       the marker
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from hvd_llama.prep.corpus import read_hashes, save_array
from hvd_llama.prep.settings import MB

KEY_SHIFT = 40  # a document's key, part << 40 | row, orders documents as the corpus does
ROW_MASK = np.uint64((1 << KEY_SHIFT) - 1)
BYTES_PER_DOC = 160  # a bucket's peak memory per document: its four columns, the sort, the selections
DROPS, KEPT = ".drops.npy", ".kept.npy"


class PartRef(NamedTuple):
    """A part that counts: its index, its folder, and how many of its rows count (fewer after a cap's stop)."""
    index: int
    folder: Path
    rows: int


def keys(part: int, rows: np.ndarray) -> np.ndarray:
    return (np.uint64(part) << np.uint64(KEY_SHIFT)) | rows.astype(np.uint64)


def key_part(key: int) -> int:
    return int(key) >> KEY_SHIFT


def key_row(key: int) -> int:
    return int(key) & int(ROW_MASK)


def bucket_count(documents: int, memory_mb: float) -> int:
    return max(1, math.ceil(documents * BYTES_PER_DOC / (memory_mb * MB)))


def bucket_range(index: int, count: int) -> tuple[int, int]:
    """[low, high) of the hashes' first halves (hi) in bucket `index` of `count`."""
    return (index << 64) // count, ((index + 1) << 64) // count


def _slice(sorted_hi: np.ndarray, low: int, high: int) -> slice:
    start = int(np.searchsorted(sorted_hi, np.uint64(low)))
    stop = len(sorted_hi) if high >= 1 << 64 else int(np.searchsorted(sorted_hi, np.uint64(high)))
    return slice(start, stop)


def load_bucket(parts: Sequence[PartRef], index: int, count: int) -> np.ndarray:
    """uint64 [4, n]: hi, lo, key and characters of every counted document of the bucket, sorted by (hi, lo, key)."""
    low, high = bucket_range(index, count)
    columns = []
    for part in parts:
        hashes = read_hashes(part.folder)
        hi, lo, rows, chars = np.asarray(hashes[:, _slice(hashes[0], low, high)])
        counted = rows < part.rows
        columns.append(np.stack([hi[counted], lo[counted], keys(part.index, rows[counted]), chars[counted]]))
    table = np.concatenate(columns, axis=1) if columns else np.zeros((4, 0), np.uint64)
    # Each part's slice is in (hi, lo, row) order and parts come in order: a stable sort by hash keeps key order.
    return table[:, np.lexsort((table[1], table[0]))]


def dedup_bucket(parts: Sequence[PartRef], index: int, count: int, drop_copies: bool,
                 prefix: Path) -> tuple[dict, dict[Path, dict]]:
    """Deduplicate one bucket into PREFIX.drops.npy and PREFIX.kept.npy; returns its marker's content and files."""
    table = load_bucket(parts, index, count)
    copy = np.zeros(table.shape[1], dtype=bool)
    if drop_copies:
        copy[1:] = (table[0, 1:] == table[0, :-1]) & (table[1, 1:] == table[1, :-1])
    prefix.parent.mkdir(parents=True, exist_ok=True)
    files = {**save_array(prefix.with_name(prefix.name + DROPS), np.sort(table[2, copy])),
             **save_array(prefix.with_name(prefix.name + KEPT), table[:, ~copy])}
    return {"documents": table.shape[1], "dropped": int(copy.sum())}, files


def read_kept(prefix: Path) -> np.ndarray:
    return np.load(prefix.with_name(prefix.name + KEPT), mmap_mode="r")


def dropped_rows(part: int, prefixes: Sequence[Path]) -> np.ndarray:
    """The rows of `part` that are copies of documents before them, from every bucket's drops."""
    low, high = part << KEY_SHIFT, (part + 1) << KEY_SHIFT
    found = [np.zeros(0, np.uint64)]
    for prefix in prefixes:
        drops = np.load(prefix.with_name(prefix.name + DROPS), mmap_mode="r")
        found.append(np.asarray(drops[_slice(drops, low, high)]) & ROW_MASK)
    return np.concatenate(found)


def kept_mask(part: PartRef, prefixes: Sequence[Path]) -> np.ndarray:
    """Which rows of the part are kept: counted (before a cap's stop) and not a copy."""
    mask = np.zeros(read_hashes(part.folder).shape[1], dtype=bool)
    mask[:part.rows] = True
    mask[dropped_rows(part.index, prefixes).astype(np.int64)] = False
    return mask
