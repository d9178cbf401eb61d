"""The end of a prepare run, on rank 0 once every rank is done: the parts' shards and counts merged into
meta.json (and, for fine-tuning examples, each split's index), the shards recorded as verified (their checksums
were computed as they were written), and the staging folder renamed to --out."""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from hvd_llama.files import atomic_write_text, sha256_file
from hvd_llama.prep import dedup, split
from hvd_llama.prep.run import Run, merge_counts
from hvd_llama.prep.staging import check_out_dir
from hvd_llama.prep.token_shards import (
    META_FORMAT,
    META_VERSION,
    VERIFIED,
    file_signature,
    record_verified,
    token_dtype,
)
from hvd_llama.tokenizer import Tokenizer

ENCODED = "encoded.json"


def merge_index(root: Path, name: str, refs: list[dedup.PartRef], entries: list[dict]) -> dict:
    """{split}_index.npy from the parts' indexes, each part's starts moved by the tokens of the parts before it."""
    path = root / f"{name}_index.npy"
    index = np.lib.format.open_memmap(path, mode="w+", dtype="<i8", shape=(sum(e["examples"] for e in entries), 3))
    row = offset = 0
    for ref, entry in zip(refs, entries):
        part = np.load(ref.folder / path.name)
        index[row:row + len(part)] = part + np.array([offset, 0, 0])
        row, offset = row + len(part), offset + entry["tokens"]
    index.flush()
    del index
    return {"file": path.name, "sha256": sha256_file(path)}


def merge_split(run: Run, name: str, refs: list[dedup.PartRef], encoded: list[dict]) -> dict:
    """meta.json's entry of a split: the parts' counts summed and their shards in part order."""
    entries = [e["splits"][name] for e in encoded]
    unit = "examples" if run.options.sft else "documents"
    merged = {unit: sum(e[unit] for e in entries), "chars": sum(e["chars"] for e in entries),
              "tokens": sum(e["tokens"] for e in entries), "shards": [s for e in entries for s in e["shards"]]}
    if run.options.sft:
        prompt_tokens = sum(e["prompt_tokens"] for e in entries)
        merged.update(prompt_tokens=prompt_tokens, response_tokens=merged["tokens"] - prompt_tokens,
                      index=merge_index(run.staging.root, name, refs, entries))
    return merged


def cleaning_report(run: Run, counts: dict, dropped: dict) -> dict:
    options = run.options
    if options.sft:
        return {"steps": ["unicode", "control"], "unicode_form": options.clean.unicode_form,
                "changed": counts["cleaning"]["changed"], "duplicates": dropped["documents"]}
    removed = counts["cleaning"]
    if options.clean.dedup:
        removed["dedup"] = dropped
    return {"steps": list(options.clean.steps), "unicode_form": options.clean.unicode_form,
            "min_chars": options.clean.min_chars, "removed": removed}


def finish(run: Run, refs: list[dedup.PartRef], buckets: int, selection: split.Selection, tokenizer: Tokenizer,
           counts: dict, peaks: list[dict], command: str, started: float) -> dict:
    """Write meta.json and publish the folder as --out; returns meta.json's content."""
    options, root = run.options, run.staging.root
    encoded = [run.staging.done(ref.folder / ENCODED) for ref in refs]
    splits = {name: merge_split(run, name, refs, encoded) for name in ("train", "val")}
    meta = {
        "format": META_FORMAT, "format_version": META_VERSION, "kind": "sft" if options.sft else "pretrain",
        "vocab_size": tokenizer.vocab_size, "dtype": token_dtype(tokenizer.vocab_size).name,
        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
        "unk_id": tokenizer.unk_id, "tokenizer": tokenizer.path.name, "tokenizer_sha256": tokenizer.sha256,
        "tokenizer_trained": options.tokenizer.path is None, "split_method": selection.method,
        "val_fraction": options.output.val_fraction, "splits": splits, "inputs": counts["inputs"],
        "cleaning": cleaning_report(run, counts, merge_counts([e["dedup"] for e in encoded])),
        **({"sft": {"prompt_field": options.sft.prompt_field, "response_field": options.sft.response_field}}
           if options.sft else {}),
        "command": command, "settings": json.loads(json.dumps(asdict(options))),
        "work": {"ranks": run.ranks.size(), "parts": len(run.parts), "buckets": buckets,
                 "workers_per_rank": run.workers, "peak_rss_bytes": max(p["main"] for p in peaks),
                 "worker_peak_rss_bytes": max(p["workers"] for p in peaks)},
        "python": platform.python_version(), "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_text(root / "meta.json", json.dumps(meta, indent=2) + "\n")
    outputs = [s["file"] for entry in splits.values() for s in entry["shards"]]
    outputs += [entry["index"]["file"] for entry in splits.values() if "index" in entry]
    record_verified(root, {name: file_signature(root / name) for name in outputs})
    check_out_dir(run.staging.out, options.output.overwrite)  # something may have appeared there meanwhile
    run.staging.publish({"meta.json", tokenizer.path.name, VERIFIED, *outputs})
    return meta
