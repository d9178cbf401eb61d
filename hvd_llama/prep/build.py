"""The steps of a prepare run, in one process or on every rank of a job, each rank doing its share:

1. read: each part of the input is read and cleaned into the staging folder (corpus.py), part p by rank p % size;
2. dedup: each bucket of hashes is deduplicated (dedup.py), bucket b by rank b % size;
3. select: the ranks count what they own and agree on the cap's cut and the split (split.py); rank 0 trains the
   tokenizer on a sample every rank proposes candidates for, and every rank loads it;
4. encode: each part's kept documents become its shards (encode.py);
5. finish: rank 0 writes meta.json once every rank is done, and renames the staging folder to --out.

Steps 1, 2 and 4 leave a marker per unit, so a re-run skips what is done (staging.py). After each step the ranks
agree: a user error on any rank stops all of them with the same one line. `ranks` is hvd_llama.parallel under a
launcher, or procs.OneProcess: this module never imports Horovod.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from hvd_llama.cli import UserError
from hvd_llama.prep import corpus, dedup, encode, split
from hvd_llama.prep.finish import ENCODED, finish
from hvd_llama.prep.run import Run, merge_counts
from hvd_llama.prep.settings import MB, PrepareOptions
from hvd_llama.prep.sources import Piece, find_input_files, plan_parts
from hvd_llama.prep.staging import Staging, check_out_dir
from hvd_llama.prep.text import CHAR_STEPS
from hvd_llama.prep.token_shards import file_signature, token_dtype
from hvd_llama.prep.vocabulary import tokenizer_step
from hvd_llama.procs import peak_rss, say
from hvd_llama.tokenizer import Tokenizer


def build(options: PrepareOptions, ranks, workers: int, command: str) -> dict:
    """Run every step on this rank; returns meta.json's content (on every rank). A user error removes the staging
    folder; an interruption or a crash leaves it for a re-run to continue."""
    started = time.perf_counter()
    run = Run(options, ranks, Staging(Path(options.output.out)), [], workers)
    job = run.agree("job", lambda: open_job(run) if run.main else None)[0]
    run.parts = [[Piece(*piece) for piece in part] for part in job["parts"]]
    run.agree("shared", lambda: run.staging.check_shared(job["token"], ranks.rank()))
    try:
        refs = read_step(run)
        prefixes = dedup_step(run, refs)
        selection = select_step(run, refs, prefixes)
        counts = read_counts(run, refs, selection)
        check_selection(run, selection, counts)
        tokenizer = tokenizer_step(run, selection, prefixes)
        peaks = encode_step(run, refs, prefixes, selection, tokenizer)
        return run.agree("finish", lambda: finish(run, refs, len(prefixes), selection, tokenizer, counts, peaks,
                                                  command, started) if run.main else None)[0]
    except UserError:
        if run.main:
            run.staging.remove()
        raise


def open_job(run: Run) -> dict:
    """Rank 0: find the input files, then resume the staging folder's job for them or start a new one."""
    options = run.options
    files = find_input_files(options.inputs.paths, options.inputs.include, options.inputs.exclude)
    check_out_dir(run.staging.out, options.output.overwrite)
    part_bytes = max(1, int(options.output.part_mb * MB))
    job, resumed = run.staging.open_job(
        options.identity(), [[str(f), *file_signature(f)] for f in files],
        lambda: [list(map(list, part)) for part in plan_parts(files, part_bytes, records_only=bool(options.sft))])
    if resumed:
        done = sum((run.staging.part(i) / corpus.READ).exists() for i in range(len(job["parts"])))
        say(f"resuming the unfinished run in {run.staging.root}: {done} of {len(job['parts'])} parts already read")
    return job


def read_counts(run: Run, refs: list[dedup.PartRef], selection: split.Selection) -> dict:
    """meta.json's "inputs" and what cleaning changed, summed over the parts up to the one a cap cuts (which
    another rank than the one that stopped there may have read to its end)."""
    last = len(run.parts) if selection.cut is None else dedup.key_part(selection.cut)

    def mine() -> dict:
        markers = [run.staging.done(ref.folder / corpus.READ) for ref in run.my_parts(refs) if ref.index <= last]
        return merge_counts([{key: marker[key] for key in ("inputs", "cleaning")} for marker in markers])

    return merge_counts(run.agree("counts", mine))


def check_selection(run: Run, selection: split.Selection, counts: dict) -> None:
    """The one-line errors of a corpus too small for what was asked of it."""
    options, inputs = run.options, counts["inputs"]
    fraction = options.output.val_fraction
    if selection.documents == 0 and options.sft:
        raise UserError(f"no fine-tuning examples in {inputs['files']} file(s) ({inputs['bytes']:,} bytes): --sft "
                        f"needs JSON lines with {options.sft.prompt_field!r} and {options.sft.response_field!r} fields")
    if selection.documents == 0:
        dropped = ", ".join(f"{step}: {r['documents']}" for step, r in counts["cleaning"].items()
                            if r["documents"] and step not in CHAR_STEPS)
        raise UserError(f"the corpus is empty after cleaning: {inputs['documents']} documents read from "
                        f"{inputs['files']} files, all dropped ({dropped or 'no text'})")
    if selection.method == "characters":
        train = int(selection.chars * (1 - fraction))
        val = selection.chars - train
    else:
        val = split.validation_count(selection.documents, fraction)
        train = selection.documents - val
    if train and (val or not fraction):
        return
    if options.sft:
        raise UserError(f"{selection.documents} example(s) are too few to hold out --val-fraction {fraction}; add "
                        "examples or use --val-fraction 0")
    raise UserError(f"the corpus ({selection.chars} characters) is too small to hold out --val-fraction {fraction}")


# ------------------------------------------------------------------------------------------------ 1. read

def read_step(run: Run) -> list[dedup.PartRef]:
    """Read this rank's parts; returns the parts that count: every rank's, up to the earliest stop at a cap (all
    parts before it were read: each rank reads its parts in order up to its own stop)."""
    options = run.options
    caps = corpus.Caps(options.inputs, distinct=options.drop_copies)

    def work() -> tuple[dict, Optional[tuple[int, int]]]:
        rows, stop = {}, None
        with run.bar(sum(p.size for i in run.mine(len(run.parts)) for p in run.parts[i]), "read+clean") as bar:
            for index in run.mine(len(run.parts)):
                if stop is not None:
                    break  # the cap is reached: nothing after this rank's stop can be kept
                run.staging.check()
                folder = run.staging.part(index)
                marker = run.staging.done(folder / corpus.READ)
                if marker is None:
                    marker = run.staging.mark(folder / corpus.READ, *corpus.read_part(
                        run.parts[index], folder, options, caps, bar.update))
                    reached = marker["stop"]
                else:
                    bar.update(sum(p.size for p in run.parts[index]))
                    reached = marker["stop"]
                    if reached is None and caps.active:  # a part read before: its documents still count to the cap
                        reached = caps.add_part(folder)
                rows[index] = marker["documents"]
                if reached is not None:
                    stop = (index, reached)
        return rows, stop

    gathered = run.agree("read", work)
    stops = [stop for _, stop in gathered if stop is not None]
    last = min(stops) if stops else None
    rows = {index: n for part_rows, _ in gathered for index, n in part_rows.items()}
    refs = [dedup.PartRef(index, run.staging.part(index), last[1] + 1 if last and index == last[0] else rows[index])
            for index in sorted(rows) if last is None or index <= last[0]]
    return refs


# ----------------------------------------------------------------------------------------------- 2. dedup

def dedup_step(run: Run, refs: list[dedup.PartRef]) -> list[Path]:
    """Deduplicate this rank's buckets; returns every bucket's prefix. The buckets' folder is named by what they
    cover, so a resumed run that counts other parts (another cap stop) does not reuse them."""
    count = dedup.bucket_count(sum(ref.rows for ref in refs), run.options.work.memory_mb)
    covers = hashlib.blake2b(json.dumps([(r.index, r.rows) for r in refs]).encode(), digest_size=6).hexdigest()
    prefixes = [run.staging.bucket(count, b, covers) for b in range(count)]

    def work() -> None:
        for b in run.mine(count):
            run.staging.check()
            marker = prefixes[b].with_name(prefixes[b].name + ".json")
            if run.staging.done(marker) is None:
                run.staging.mark(marker, *dedup.dedup_bucket(refs, b, count, run.options.drop_copies, prefixes[b]))

    run.agree("dedup", work)
    return prefixes


# ---------------------------------------------------------------------------------------------- 3. select

def select_step(run: Run, refs: list[dedup.PartRef], prefixes: list[Path]) -> split.Selection:
    """Agree on the cap's cut and the split."""
    options = run.options
    mine = run.my_parts(refs)
    tallies = [t for part in run.agree("tally", lambda: [split.tally(r, prefixes) for r in mine]) for t in part]
    by_index = {ref.index: ref for ref in refs}

    def kept_chars(index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.flatnonzero(dedup.kept_mask(by_index[index], prefixes))
        return rows, np.asarray(corpus.read_table(by_index[index].folder)[corpus.CHARS])[rows]

    cut, documents, chars = split.find_cut(tallies, options.inputs.max_docs, options.inputs.max_chars, kept_chars)
    if documents == 0:
        return split.Selection("documents", 0, 0)
    if options.sft is None and documents < split.MIN_DOCS_FOR_DOCUMENT_SPLIT:
        partial = split.Selection("characters", documents, chars, cut)

        def kept_documents(ref: dedup.PartRef) -> list[tuple[int, int]]:
            rows = partial.kept(ref, prefixes)
            chars_of = np.asarray(corpus.read_table(ref.folder)[corpus.CHARS])[rows]
            return list(zip(dedup.keys(ref.index, rows).tolist(), chars_of.tolist()))

        docs = run.agree("documents", lambda: [d for ref in mine for d in kept_documents(ref)])
        cut_doc = split.character_cut(sorted(d for rank_docs in docs for d in rank_docs), options.output.val_fraction)
        return split.Selection("characters", documents, chars, cut, char_cut=cut_doc)
    method = "examples" if options.sft else "documents"
    n_val = split.validation_count(documents, options.output.val_fraction)
    if not n_val:
        return split.Selection(method, documents, chars, cut)
    counts = dict(item for part in run.agree("counts", lambda: [
        (b, split.kept_in_bucket(prefixes[b], cut).shape[1]) for b in run.mine(len(prefixes))]) for item in part)
    threshold = split.nth_smallest([counts[b] for b in range(len(prefixes))], n_val,
                                   lambda b: split.kept_in_bucket(prefixes[b], cut))
    return split.Selection(method, documents, chars, cut, threshold=threshold)


# ---------------------------------------------------------------------------------------------- 4. encode

def dropped_copies(ref: dedup.PartRef, prefixes: list[Path], selection: split.Selection) -> dict:
    """The part's copies dropped by deduplication, within the cap's cut: documents and characters."""
    rows = dedup.dropped_rows(ref.index, prefixes).astype(np.int64)
    rows = rows[rows < ref.rows]
    if selection.cut is not None:
        rows = rows[dedup.keys(ref.index, rows) <= np.uint64(selection.cut)]
    return {"documents": len(rows), "chars": int(np.asarray(corpus.read_table(ref.folder)[corpus.CHARS])[rows].sum())}


def encode_step(run: Run, refs: list[dedup.PartRef], prefixes: list[Path], selection: split.Selection,
                tokenizer: Tokenizer) -> list[dict]:
    """Encode this rank's parts into their shards; returns every rank's peak memory."""
    dtype = token_dtype(tokenizer.vocab_size)
    examples = run.options.sft is not None
    encoder = encode.ExampleEncoder if examples else encode.DocEncoder
    mine = run.my_parts(refs)
    peaks: list[int] = []

    def encode_part(ref: dedup.PartRef) -> None:
        table = corpus.read_table(ref.folder)
        rows = selection.kept(ref, prefixes)
        training = selection.training_chars(ref.index, rows, table)
        store = ref.folder / corpus.STORE
        splits, files = encode.encode_part(
            store, encode.part_ranges(store, table, rows, training),
            lambda tasks: encode.encode_batches(tasks, tokenizer.path, dtype, run.workers, encoder, peaks),
            run.staging.root, ref.folder, f"{ref.index:05d}", dtype, run.options.output.shard_tokens, examples)
        counts = encode.split_counts(table, rows, training, examples)
        run.staging.mark(ref.folder / ENCODED, {
            "tokenizer": tokenizer.sha256, "splits": {name: {**counts[name], **splits[name]} for name in splits},
            "dedup": dropped_copies(ref, prefixes, selection)}, files)

    def work() -> dict:
        with run.bar(sum((r.folder / corpus.STORE).stat().st_size for r in mine), "encode") as bar:
            for ref in mine:
                run.staging.check()
                done = run.staging.done(ref.folder / ENCODED)
                if done is None or done["tokenizer"] != tokenizer.sha256:
                    encode_part(ref)
                bar.update((ref.folder / corpus.STORE).stat().st_size)
        return {"main": peak_rss(), "workers": max(peaks, default=0)}

    return run.agree("encode", work)


