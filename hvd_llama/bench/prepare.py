"""Data-preparation speed and memory: `prepare` on the standard library and on generated corpora of two sizes (the
larger GROWTH times the smaller: peak memory should not follow), on one rank and on two (horovodrun); encoding in
workers against SentencePiece alone; and opening a corpus of 10,000 shards. Each in processes of their own
(prepare_steps.py)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from hvd_llama.bench.common import MB, Bench, horovodrun, python_module, read_measurement, table
from hvd_llama.bench.synthetic import write_corpus
from hvd_llama.training.data import read_meta

PREPARE_MB = 1024  # the larger generated corpus
GROWTH = 4  # the smaller one is PREPARE_MB / GROWTH
PARTS = 32  # parts of the larger corpus (--part-mb): enough for two ranks to share the smaller one evenly
ENCODE_EFFICIENCY_TARGET = 0.9
OPEN_SHARDS = 10_000
NODE_CORES = (32, 64)  # the nodes the README's hours per TB are given for


def measure_prepare(b: Bench, inputs: Sequence[str], out: Path, name: str, ranks: int = 1,
                    options: Sequence = ()) -> dict:
    """Wall time, MB/s (per core), peak memory (the largest process of the tree, and prepare's own per rank and
    per encoding worker) of `python -m hvd_llama.prepare` with `options`, under horovodrun for ranks > 1."""
    usage_json = b.work / f"{name}_rusage.json"
    command = python_module("hvd_llama.prepare", "--input", *inputs, "--out", out, *options)
    b.run(python_module("hvd_llama.bench.prepare_steps", "rusage", "--json", usage_json, "--",
                        *(horovodrun(ranks, command) if ranks > 1 else command)), f"{name}.log")
    usage, meta = read_measurement(usage_json), read_meta(out)
    n_bytes, cores = meta["inputs"]["bytes"], len(os.sched_getaffinity(0))
    splits, work = meta["splits"].values(), meta["work"]
    return {"input": list(inputs), "input_bytes": n_bytes, "documents": sum(s["documents"] for s in splits),
            "tokens": sum(s["tokens"] for s in splits), "seconds": usage["seconds"],
            "mb_per_s": n_bytes / MB / usage["seconds"], "mb_per_s_per_core": n_bytes / MB / usage["seconds"] / cores,
            "prepare_reported_s": meta["seconds"], "peak_rss_bytes": usage["max_rss_bytes"],
            "rank_peak_rss_bytes": work["peak_rss_bytes"], "worker_peak_rss_bytes": work["worker_peak_rss_bytes"],
            "ranks": work["ranks"], "workers_per_rank": work["workers_per_rank"], "parts": work["parts"],
            "buckets": work["buckets"]}


def generated_runs(b: Bench, folder: Path) -> dict:
    """The two generated corpora on one rank, the smaller also on two ranks."""
    runs = {}
    for mb in (b.args.prepare_mb / GROWTH, b.args.prepare_mb):
        corpus = folder / "corpus.jsonl"
        start = time.perf_counter()
        corpus_bytes = write_corpus(corpus, int(mb * MB))
        write_s = time.perf_counter() - start
        try:
            for ranks in (1, 2) if mb < b.args.prepare_mb else (1,):
                name = f"generated_{mb:g}mb_{ranks}rank"
                runs[name] = {**measure_prepare(b, [str(corpus)], folder / name, f"prepare_{name}", ranks,
                                                ["--part-mb", b.args.prepare_mb / PARTS]),
                              "requested_mb": mb, "corpus_bytes": corpus_bytes, "corpus_write_s": write_s}
                shutil.rmtree(folder / name, ignore_errors=True)  # gigabytes: do not keep them around
        finally:
            corpus.unlink(missing_ok=True)
    return runs


def bench_prepare(b: Bench) -> dict:
    folder = b.work / "prepare"
    folder.mkdir(parents=True, exist_ok=True)
    stdlib = measure_prepare(b, ["stdlib"], folder / "stdlib", "prepare_stdlib")
    generated = generated_runs(b, folder)
    encode_json, open_json = folder / "encode.json", folder / "open.json"
    workers = len(os.sched_getaffinity(0))
    b.run(python_module("hvd_llama.bench.prepare_steps", "encode", "--json", encode_json, "--tokenizer",
                        folder / "stdlib" / "tokenizer.model", "--mb", b.args.encode_mb, "--workers", workers,
                        "--folder", folder / "encode"), "prepare_encode.log")
    b.run(python_module("hvd_llama.bench.prepare_steps", "open", "--json", open_json, "--shards", OPEN_SHARDS,
                        "--folder", folder / "shards"), "prepare_open.log")
    shutil.rmtree(folder / "shards", ignore_errors=True)
    raw = read_measurement(encode_json)
    speeds = {k: raw["bytes"] / MB / raw[f"{k}_s"]
              for k in ("sentencepiece_single", "encode_single", "encode_parallel")}
    efficiency = speeds["encode_parallel"] / (speeds["sentencepiece_single"] * workers)
    sizes = sorted((r for r in generated.values() if r["ranks"] == 1), key=lambda r: r["input_bytes"])
    return {"stdlib": stdlib, "generated": generated,
            "peak_rss_growth": sizes[-1]["peak_rss_bytes"] / sizes[0]["peak_rss_bytes"],
            "input_growth": sizes[-1]["input_bytes"] / sizes[0]["input_bytes"],
            "encode": {"bytes": raw["bytes"], "documents": raw["documents"], "workers": workers,
                       "mb_per_s": speeds, "parallel_efficiency": efficiency,
                       "target": ENCODE_EFFICIENCY_TARGET, "target_met": efficiency >= ENCODE_EFFICIENCY_TARGET},
            "open": read_measurement(open_json),
            "peak_rss_note": "ru_maxrss of RUSAGE_CHILDREN: the largest single process of prepare's process tree"}


def hours_per_tb(mb_per_s_per_core: float, cores: int) -> float:
    return 1e6 / (mb_per_s_per_core * cores) / 3600


def show_prepare(r: dict) -> list[str]:
    runs = [("--input stdlib", r["stdlib"])] + [
        (f"generated {p['requested_mb']:g} MB, {p['ranks']} rank(s)", p) for p in r["generated"].values()]
    rows = [(name, f"{p['input_bytes'] / MB:,.1f}", f"{p['seconds']:.1f}", f"{p['mb_per_s']:.2f}",
             f"{p['mb_per_s_per_core']:.2f}", f"{p['peak_rss_bytes'] / MB:,.0f}",
             f"{p['rank_peak_rss_bytes'] / MB:,.0f} + {p['worker_peak_rss_bytes'] / MB:,.0f}", p["buckets"],
             f"{p['tokens']:,}") for name, p in runs]
    e, o = r["encode"], r["open"]
    speeds = e["mb_per_s"]
    per_core = max(r["generated"].values(), key=lambda p: p["input_bytes"])["mb_per_s_per_core"]  # steady state
    return [*table(("prepare", "input MB", "seconds", "MB/s", "MB/s/core", "peak RSS MB", "rank + worker MB",
                    "buckets", "tokens"), rows),
            f"input x{r['input_growth']:.1f} -> peak RSS x{r['peak_rss_growth']:.2f}; at {per_core:.2f} MB/s per core: "
            + ", ".join(f"{hours_per_tb(per_core, n):.1f} h per TB on a {n}-core node" for n in NODE_CORES),
            f"encode {e['bytes'] / MB:.0f} MB: SentencePiece alone 1 process "
            f"{speeds['sentencepiece_single']:.2f} MB/s | encode_batches 1 process {speeds['encode_single']:.2f} MB/s "
            f"| {e['workers']} workers {speeds['encode_parallel']:.2f} MB/s = {100 * e['parallel_efficiency']:.0f}% "
            f"of {e['workers']} x SentencePiece alone (target >= {100 * e['target']:.0f}%: "
            f"{'met' if e['target_met'] else 'NOT MET'})",
            f"open {o['shards']:,} shards ({o['bytes'] / MB:,.0f} MB): first open, checking every checksum "
            f"{o['verify_s']:.1f} s; later opens {o['open_s']:.2f} s reading {o['open_read_bytes'] / MB:.1f} MB; "
            f"peak RSS {o['peak_rss_bytes'] / MB:.0f} MB, {o['maps_open']} shards mapped after reading all"]
