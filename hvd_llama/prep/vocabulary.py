"""The tokenizer of a prepare run: --tokenizer copied, or a SentencePiece model trained once, by rank 0, on a
sample of the training documents drawn across every rank (split.py chooses it; never validation text), then
loaded by every rank from the staging folder."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from hvd_llama.cli import UserError
from hvd_llama.files import sha256_file
from hvd_llama.prep import corpus, split
from hvd_llama.prep.run import Run
from hvd_llama.prep.text import sentence_chunks
from hvd_llama.tokenizer import Tokenizer, train_tokenizer

TOKENIZER_SENTENCE_CHARS = 1000
MARKER = "tokenizer.json"


def tokenizer_step(run: Run, selection: split.Selection, prefixes: list[Path]) -> Tokenizer:
    """Copy --tokenizer, or train one on a sample of the training documents (never on validation text), drawn
    across the ranks; every rank loads it."""
    options, path = run.options.tokenizer, run.staging.root / "tokenizer.model"
    marker = run.staging.root / MARKER
    sample = None
    if options.path is None and run.staging.done(marker) is None:
        sample = draw_sample(run, selection, prefixes, options.sentences * TOKENIZER_SENTENCE_CHARS)
    run.agree("tokenizer", lambda: make_tokenizer(run, path, marker, sample) if run.main else None)
    return load_tokenizer(path)


def draw_sample(run: Run, selection: split.Selection, prefixes: list[Path], budget: int) -> np.ndarray:
    """The sample (split.first_by_priority) of every rank's buckets. Each rank finds its own first candidates
    worth `budget` characters; none after the smallest of the ranks' last priorities can be in the sample, so
    only the candidates up to it travel (about one rank's worth in all, not every rank's)."""
    mine = np.zeros((3, 0), np.uint64)
    for b in run.mine(len(prefixes)):
        kept = split.kept_in_bucket(prefixes[b], selection.cut)
        mine = split.first_by_priority(np.concatenate([mine, split.sample_candidates(kept, selection, budget)],
                                                      axis=1), budget)
    full = int(mine[1].astype(np.int64).sum()) >= budget
    bound = min(run.agree("sample.bound", lambda: int(mine[0, -1]) if full else (1 << 64) - 1))
    candidates = run.agree("sample", lambda: mine[:, mine[0] <= np.uint64(bound)])
    return split.first_by_priority(np.concatenate(candidates, axis=1), budget)


def make_tokenizer(run: Run, path: Path, marker: Path, sample: Optional[np.ndarray]) -> None:
    options = run.options.tokenizer
    if options.path is not None:
        shutil.copyfile(options.path, path)
    elif run.staging.done(marker) is None:
        sentences = sample_sentences(run, sample, options.sentences)
        print(f"training a {options.vocab_size}-piece tokenizer on {len(sentences):,} text chunks", file=sys.stderr)
        train_tokenizer(sentences, path, options.vocab_size, options.sentences, TOKENIZER_SENTENCE_CHARS)
        run.staging.mark(marker, {}, {path: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}})


def sample_sentences(run: Run, sample: np.ndarray, limit: int) -> list[str]:
    """The line chunks of the sampled documents' training text, in sample order, at most `limit`."""
    chosen = split.sample_parts(sample)
    by_part: dict[int, list[tuple[int, int]]] = {}
    for part, row, train_chars in chosen:
        by_part.setdefault(part, []).append((row, train_chars))
    texts: dict[tuple[int, int], list[str]] = {}
    for part, rows in by_part.items():  # one part's store open at a time
        table = corpus.read_table(run.staging.part(part))
        with open(run.staging.part(part) / corpus.STORE, "rb") as store:
            for row, train_chars in rows:
                found = corpus.read_texts(store, table, row, run.options.sft is not None)
                texts[part, row] = found if run.options.sft else [found[0][:train_chars]]
    sentences: list[str] = []
    for part, row, _ in chosen:
        for text in texts[part, row]:
            sentences += sentence_chunks(text, TOKENIZER_SENTENCE_CHARS)
        if len(sentences) >= limit:
            break
    return sentences[:limit]


def load_tokenizer(path: Path) -> Tokenizer:
    tokenizer = Tokenizer(path)
    if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
        raise UserError(f"--tokenizer {path} defines no bos/eos tokens (bos_id={tokenizer.bos_id}, "
                        f"eos_id={tokenizer.eos_id}); documents need both")
    return tokenizer
