"""Data-preparation measurements for hvd_llama.bench, run as processes of their own.

    python -m hvd_llama.bench.prepare_steps rusage --json OUT -- COMMAND ...   # wall time and peak memory of COMMAND
    python -m hvd_llama.bench.prepare_steps encode --json OUT --tokenizer MODEL --mb 32 --folder DIR
    python -m hvd_llama.bench.prepare_steps open --json OUT --shards 10000 --folder DIR  # opening many shards

`rusage` is a fresh parent, so getrusage(RUSAGE_CHILDREN) sees only COMMAND and its own children (ru_maxrss
is the largest single process among them; Linux counts a child's memory from before its exec too, so this
process stays small). `encode` compares SentencePiece's own single-process encoding with prepare's
encode_batches in one process and in a pool of workers. `open` times opening a corpus of many shards as training
does. This module imports no torch (bench.common, which does, only inside the measurements that use it): the
pool's spawned workers import it again, and should start as fast as prepare's own, and it keeps `rusage` small.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from hvd_llama.bench.synthetic import unique_documents
from hvd_llama.cli import UserError, run_main
from hvd_llama.files import atomic_write_text
from hvd_llama.prep.encode import ENCODE_BATCH_BYTES, batch_ranges, encode_batches, start_encoding_server
from hvd_llama.prep.token_shards import META_FORMAT, META_VERSION, ShardWriter, token_dtype
from hvd_llama.tokenizer import Tokenizer


def measure_rusage(args: argparse.Namespace) -> dict:
    command = args.command
    if not command:
        raise UserError("rusage: give the command to measure after --")
    start = time.perf_counter()
    returncode = subprocess.call(command)
    seconds = time.perf_counter() - start
    max_rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    return {"command": command, "returncode": returncode, "seconds": seconds, "max_rss_bytes": max_rss_kib * 1024}


def sentencepiece_seconds(tokenizer_path: Path, tasks, repeats: int) -> float:
    """Best time of SentencePiece alone on the tasks' texts, read into memory first, with one thread."""
    import sentencepiece as spm

    from hvd_llama.bench.common import best_seconds

    texts = []
    for store_path, ranges in tasks:
        with open(store_path, "rb") as f:
            texts.append([f.read(int(nbytes)).decode("utf-8") for _, _, nbytes in ranges])
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    return best_seconds(lambda: [sp.encode(batch, num_threads=1) for batch in texts], repeats)


def write_store(path: Path, n_bytes: float) -> np.ndarray:
    """Documents written back to back until n_bytes, as prepare's stores hold them; their (offset, 0, bytes)."""
    ranges, offset = [], 0
    with open(path, "wb") as f:
        for text in unique_documents():
            data = text.encode("utf-8")
            f.write(data)
            ranges.append((offset, 0, len(data)))
            offset += len(data)
            if offset >= n_bytes:
                return np.array(ranges, dtype=np.int64)
    raise AssertionError("unreachable: unique_documents never ends")


def measure_encode(args: argparse.Namespace) -> dict:
    """Encoding speed of the same documents three ways, each the best of --repeats runs: SentencePiece alone in
    one process (the texts already in memory, one thread), prepare's encode_batches in one process, and
    encode_batches with `workers` processes (pool start-up included, as prepare pays it; the fork server is
    started first, as prepare starts it while reading the corpus)."""
    from hvd_llama.bench.common import best_seconds

    start_encoding_server(args.workers)
    args.folder.mkdir(parents=True, exist_ok=True)
    store = args.folder / "store.tmp"
    try:
        ranges = write_store(store, args.mb * 1e6)
        tasks = [(str(store), batch) for batch in batch_ranges(ranges, ENCODE_BATCH_BYTES)]
        tokenizer = Tokenizer(args.tokenizer)
        dtype = token_dtype(tokenizer.vocab_size)
        sentencepiece_s = sentencepiece_seconds(args.tokenizer, tasks, args.repeats)
        seconds = {workers: best_seconds(lambda: deque(encode_batches(tasks, tokenizer.path, dtype, workers),
                                                       maxlen=0), args.repeats)
                   for workers in (1, args.workers)}
    finally:
        store.unlink(missing_ok=True)
    return {"bytes": int(ranges[:, 2].sum()), "documents": len(ranges), "workers": args.workers,
            "repeats": args.repeats, "sentencepiece_single_s": sentencepiece_s, "encode_single_s": seconds[1],
            "encode_parallel_s": seconds[args.workers]}


def write_shards(folder: Path, shards: int, tokens_per_shard: int) -> int:
    """A data folder of `shards` training shards (and one validation shard) as prepare lays it out, without
    verified.json; returns the shards' bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype, splits = token_dtype(4096), {}
    for name, count in (("train", shards), ("val", 1)):
        writer = ShardWriter(folder, name, dtype, tokens_per_shard)
        for _ in range(count):
            writer.write(np.arange(tokens_per_shard) % 4096)
        found = writer.close()
        splits[name] = {"documents": count, "chars": 0, "tokens": count * tokens_per_shard, "shards": found}
    atomic_write_text(folder / "meta.json", json.dumps({
        "format": META_FORMAT, "format_version": META_VERSION, "kind": "pretrain", "vocab_size": 4096,
        "dtype": dtype.name, "bos_id": 1, "eos_id": 2, "splits": splits}))
    return sum(p.stat().st_size for p in folder.glob("*.bin"))


def read_bytes() -> int:
    """Bytes this process has read so far (Linux's rchar)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def measure_open(args: argparse.Namespace) -> dict:
    """Open a corpus of --shards shards as training does: once with every checksum checked (a folder without
    verified.json, or train --verify-data), then, best of --repeats, as every later start does; and read a
    window of every shard, counting the shards still mapped."""
    from hvd_llama.bench.common import best_seconds
    from hvd_llama.procs import peak_rss
    from hvd_llama.training.data import TokenWindows

    n_bytes = write_shards(args.folder, args.shards, args.tokens_per_shard)
    start = time.perf_counter()
    TokenWindows(args.folder, "train", seq_len=128)
    verify_s = time.perf_counter() - start
    before = read_bytes()
    open_s = best_seconds(lambda: TokenWindows(args.folder, "train", seq_len=128), args.repeats)
    read_during = (read_bytes() - before) / args.repeats
    windows = TokenWindows(args.folder, "train", seq_len=128)
    for k in range(args.shards):
        windows[k * args.tokens_per_shard // 128]
    return {"shards": args.shards, "bytes": n_bytes, "verify_s": verify_s, "open_s": open_s,
            "open_read_bytes": read_during, "peak_rss_bytes": peak_rss(), "maps_open": len(windows._maps)}


MEASUREMENTS = {"rusage": measure_rusage, "encode": measure_encode, "open": measure_open}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hvd_llama.bench.prepare_steps", description=__doc__.split("\n\n")[0],
        epilog="rusage: python -m hvd_llama.bench.prepare_steps rusage --json OUT -- COMMAND ...")
    parser.add_argument("measurement", choices=MEASUREMENTS)
    parser.add_argument("--json", type=Path, required=True, help="output file")
    parser.add_argument("--tokenizer", type=Path, help="encode: a SentencePiece tokenizer.model")
    parser.add_argument("--mb", type=float, default=32.0, help="encode: megabytes (1e6 bytes) of text to encode")
    parser.add_argument("--workers", type=int, default=2, help="encode: processes of the parallel run")
    parser.add_argument("--repeats", type=int, default=3, help="encode: timed runs of each way (the fastest is kept)")
    parser.add_argument("--folder", type=Path, help="encode: where the temporary document store goes; open: the "
                                                    "corpus")
    parser.add_argument("--shards", type=int, default=10_000, help="open: training shards of the corpus")
    parser.add_argument("--tokens-per-shard", type=int, default=10_000, help="open: tokens in each shard")
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Everything after the first `--` is rusage's command, options included."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    args.command = argv[split + 1:]
    return args


def _main(argv: Optional[Sequence[str]]) -> None:
    args = parse_args(argv)
    result = MEASUREMENTS[args.measurement](args)
    atomic_write_text(args.json, json.dumps(result) + "\n")
    if result.get("returncode"):
        sys.exit(result["returncode"])


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(_main, argv)


if __name__ == "__main__":
    main()
