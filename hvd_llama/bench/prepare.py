"""Data-preparation speed: `prepare` on the standard library and on a generated corpus (wall time, MB/s, peak
memory), and parallel encoding against SentencePiece alone (measured in processes of their own:
prepare_steps.py)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from hvd_llama.bench.common import MB, Bench, python_module, read_measurement, table
from hvd_llama.bench.synthetic import write_corpus
from hvd_llama.training.data import read_meta

PREPARE_MB = 1024  # the default size of the generated corpus
ENCODE_EFFICIENCY_TARGET = 0.9


def measure_prepare(b: Bench, inputs: Sequence[str], out: Path, name: str) -> dict:
    """Wall time, MB/s of input and peak memory of `python -m hvd_llama.prepare` (a fresh process tree)."""
    usage_json = b.work / f"{name}_rusage.json"
    b.run(python_module("hvd_llama.bench.prepare_steps", "rusage", "--json", usage_json, "--",
                        *python_module("hvd_llama.prepare", "--input", *inputs, "--out", out)), f"{name}.log")
    usage, meta = read_measurement(usage_json), read_meta(out)
    n_bytes = meta["inputs"]["bytes"]
    splits = meta["splits"].values()
    return {"input": list(inputs), "input_bytes": n_bytes, "documents": sum(s["documents"] for s in splits),
            "tokens": sum(s["tokens"] for s in splits), "seconds": usage["seconds"],
            "mb_per_s": n_bytes / MB / usage["seconds"], "prepare_reported_s": meta["seconds"],
            "peak_rss_bytes": usage["max_rss_bytes"], "workers": meta["settings"]["workers"]}


def bench_prepare(b: Bench) -> dict:
    a = b.args
    folder = b.work / "prepare"
    folder.mkdir(parents=True, exist_ok=True)
    stdlib = measure_prepare(b, ["stdlib"], folder / "stdlib", "prepare_stdlib")
    corpus = folder / "corpus.jsonl"
    start = time.perf_counter()
    corpus_bytes = write_corpus(corpus, int(a.prepare_mb * MB))
    write_s = time.perf_counter() - start
    try:
        generated = measure_prepare(b, [str(corpus)], folder / "generated", "prepare_generated")
    finally:  # gigabytes: do not keep them around
        corpus.unlink(missing_ok=True)
        shutil.rmtree(folder / "generated", ignore_errors=True)
    generated.update(requested_mb=a.prepare_mb, corpus_bytes=corpus_bytes, corpus_write_s=write_s)
    encode_json = folder / "encode.json"
    workers = len(os.sched_getaffinity(0))
    b.run(python_module("hvd_llama.bench.prepare_steps", "encode", "--json", encode_json, "--tokenizer",
                        folder / "stdlib" / "tokenizer.model", "--mb", a.encode_mb, "--workers", workers,
                        "--folder", folder / "encode"), "prepare_encode.log")
    raw = read_measurement(encode_json)
    speeds = {k: raw["bytes"] / MB / raw[f"{k}_s"]
              for k in ("sentencepiece_single", "encode_single", "encode_parallel")}
    efficiency = speeds["encode_parallel"] / (speeds["sentencepiece_single"] * workers)
    return {"stdlib": stdlib, "generated": generated,
            "encode": {"bytes": raw["bytes"], "documents": raw["documents"], "workers": workers,
                       "mb_per_s": speeds, "parallel_efficiency": efficiency,
                       "target": ENCODE_EFFICIENCY_TARGET, "target_met": efficiency >= ENCODE_EFFICIENCY_TARGET},
            "peak_rss_note": "ru_maxrss of RUSAGE_CHILDREN: the largest single process of prepare's process tree"}


def show_prepare(r: dict) -> list[str]:
    rows = [(name, f"{p['input_bytes'] / MB:,.1f}", f"{p['seconds']:.1f}", f"{p['mb_per_s']:.2f}",
             f"{p['peak_rss_bytes'] / MB:,.0f}", f"{p['tokens']:,}")
            for name, p in (("--input stdlib", r["stdlib"]), (f"generated {r['generated']['requested_mb']:g} MB corpus",
                                                              r["generated"]))]
    e = r["encode"]
    speeds = e["mb_per_s"]
    met = "met" if e["target_met"] else "NOT MET"
    return [*table(("prepare", "input MB", "seconds", "MB/s", "peak RSS MB", "tokens"), rows),
            f"encode {e['bytes'] / MB:.0f} MB: SentencePiece alone 1 process "
            f"{speeds['sentencepiece_single']:.2f} MB/s | "
            f"encode_batches 1 process {speeds['encode_single']:.2f} MB/s | {e['workers']} workers "
            f"{speeds['encode_parallel']:.2f} MB/s",
            f"parallel encode = {100 * e['parallel_efficiency']:.0f}% of {e['workers']} x SentencePiece alone "
            f"(target >= {100 * e['target']:.0f}%: {met})"]

