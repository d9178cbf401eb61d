"""Decisions over the deduplicated corpus: where a --max-docs / --max-chars cap cuts it, which documents are
held out for validation, and which the tokenizer learns from. Each is made from every part's and every bucket's
files, whatever rank wrote them, in the corpus's order (part, row): the same for any number of ranks. The ranks
compute what they own and exchange counts and short lists (build.py); these functions do the arithmetic.

The split: with at least MIN_DOCS_FOR_DOCUMENT_SPLIT documents (always for examples), validation is the
val_fraction of documents with the smallest content hash, at least one, ties broken by the corpus's order; with
fewer, it is the last val_fraction of the text by characters, cutting one document in two (nanoGPT's
convention). The tokenizer's sample: training documents in the order of the second half of their hash (random,
and independent of the first half, which decides validation) until they hold `budget` characters.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from hvd_llama.prep.corpus import CHARS, HI, LO, read_table
from hvd_llama.prep.dedup import PartRef, kept_mask, key_part, key_row, keys, read_kept

MIN_DOCS_FOR_DOCUMENT_SPLIT = 20  # fewer documents are split by characters (nanoGPT's tiny Shakespeare rule)


@dataclass(frozen=True)
class Selection:
    """What every rank's encoding needs to place its documents: kept, and in which split."""
    method: str  # "documents", "characters" or "examples"
    documents: int  # kept in all, after deduplication and the cap
    chars: int
    cut: Optional[int] = None  # the key of the last document a cap keeps
    threshold: Optional[tuple[int, int, int]] = None  # documents, examples: validation is (hi, lo, key) <= it
    char_cut: Optional[tuple[int, int]] = None  # characters: (key, training characters of that document)

    def kept(self, part: PartRef, prefixes: Sequence[Path]) -> np.ndarray:
        """The part's rows that are kept, in order."""
        rows = np.flatnonzero(kept_mask(part, prefixes))
        return rows if self.cut is None else rows[keys(part.index, rows) <= np.uint64(self.cut)]

    def training_chars(self, part: int, rows: np.ndarray, table: np.ndarray) -> np.ndarray:
        """training_share of the part's rows."""
        return self.training_share(np.asarray(table[HI])[rows], np.asarray(table[LO])[rows], keys(part, rows),
                                   np.asarray(table[CHARS])[rows])

    def training_share(self, hi: np.ndarray, lo: np.ndarray, key: np.ndarray, chars: np.ndarray) -> np.ndarray:
        """How many characters of each document are training text: all of it, none (validation), or, for the
        document a character split cuts, its head."""
        chars = chars.astype(np.int64)
        if self.char_cut is not None:
            cut_key, head = self.char_cut
            return np.where(key < np.uint64(cut_key), chars, np.where(key == np.uint64(cut_key), head, 0))
        if self.threshold is None:
            return chars
        return np.where(_at_most(hi, lo, key, self.threshold), 0, chars)


def _at_most(hi: np.ndarray, lo: np.ndarray, key: np.ndarray, bound: tuple[int, int, int]) -> np.ndarray:
    """(hi, lo, key) <= bound, element-wise and lexicographically."""
    b_hi, b_lo, b_key = (np.uint64(v) for v in bound)
    return (hi < b_hi) | ((hi == b_hi) & ((lo < b_lo) | ((lo == b_lo) & (key <= b_key))))


# ---------------------------------------------------------------------------------------------------- the cap

def tally(part: PartRef, prefixes: Sequence[Path]) -> tuple[int, int, int]:
    """(part, documents kept, their characters) before a cap's cut."""
    mask = kept_mask(part, prefixes)
    return part.index, int(mask.sum()), int(np.asarray(read_table(part.folder)[CHARS])[mask].sum())


def find_cut(tallies: Sequence[tuple[int, int, int]], max_docs: Optional[int], max_chars: Optional[int],
             kept_chars: Callable[[int], tuple[np.ndarray, np.ndarray]]) -> tuple[Optional[int], int, int]:
    """(key of the last document kept, documents kept, characters kept): the first document at which the kept
    documents reach a cap, in the corpus's order; no key when no cap is reached. kept_chars(part) gives a part's
    kept rows and their characters."""
    docs = chars = 0
    for index, count, part_chars in sorted(tallies):
        if (max_docs and docs + count >= max_docs) or (max_chars and chars + part_chars >= max_chars):
            rows, row_chars = kept_chars(index)
            all_docs, all_chars = docs + np.arange(1, len(rows) + 1), chars + np.cumsum(row_chars)
            reached = np.zeros(len(rows), dtype=bool)
            if max_docs:
                reached |= all_docs >= max_docs
            if max_chars:
                reached |= all_chars >= max_chars
            last = int(np.argmax(reached))
            return int(keys(index, rows[last:last + 1])[0]), int(all_docs[last]), int(all_chars[last])
        docs, chars = docs + count, chars + part_chars
    return None, docs, chars


# ----------------------------------------------------------------------------------------------- the split

def kept_in_bucket(prefix: Path, cut: Optional[int]) -> np.ndarray:
    """A bucket's kept documents (hi, lo, key, chars) within the cap's cut, in hash order."""
    kept = read_kept(prefix)
    return np.asarray(kept) if cut is None else np.asarray(kept[:, kept[2] <= np.uint64(cut)])


def validation_count(documents: int, val_fraction: float) -> int:
    return max(1, round(documents * val_fraction)) if val_fraction > 0 else 0


def nth_smallest(counts: Sequence[int], n: int, read_bucket: Callable[[int], np.ndarray]) -> tuple[int, int, int]:
    """(hi, lo, key) of the n-th smallest (1-based) kept document, from the buckets' counts in bucket order (the
    buckets cover the hash space in order) and read_bucket(b), bucket b's kept documents."""
    before = np.concatenate([[0], np.cumsum(counts)])
    bucket = int(np.searchsorted(before, n, side="left")) - 1
    hi, lo, key, _ = read_bucket(bucket)[:, n - 1 - int(before[bucket])]
    return int(hi), int(lo), int(key)


def character_cut(docs: Sequence[tuple[int, int]], val_fraction: float) -> tuple[int, int]:
    """(key, training characters) of the document the character split cuts, from every kept (key, characters)
    in order: documents before it are training text, after it validation."""
    cut = int(sum(chars for _, chars in docs) * (1 - val_fraction))
    seen = 0
    for key, chars in docs:
        if seen + chars > cut:
            return key, cut - seen
        seen += chars
    key, chars = docs[-1]
    return key, chars


# ---------------------------------------------------------------------------------------- the tokenizer's sample

def sample_candidates(kept: np.ndarray, selection: Selection, budget: int) -> np.ndarray:
    """uint64 [3, n] (lo, training characters, key) of a bucket's training documents that can be in the sample:
    the first ones by lo until they hold `budget` characters."""
    hi, lo, key, chars = kept
    train = selection.training_share(hi, lo, key, chars)
    some = train > 0
    return first_by_priority(np.stack([lo[some], train[some].astype(np.uint64), key[some]]), budget)


def first_by_priority(candidates: np.ndarray, budget: int) -> np.ndarray:
    """The candidates (lo, chars, key) in (lo, key) order, up to and including the one that reaches `budget`
    characters: merging any grouping of documents this way gives the same sample."""
    ordered = candidates[:, np.lexsort((candidates[2], candidates[0]))]
    reach = int(np.searchsorted(np.cumsum(ordered[1].astype(np.int64)), budget, side="left"))
    return ordered[:, :reach + 1]


def sample_parts(sample: np.ndarray) -> list[tuple[int, int, int]]:
    """(part, row, training characters) of each sampled document, in sample order."""
    return [(key_part(k), key_row(k), int(c)) for _, c, k in sample.T]
