"""Data-preparation measurements for hvd_llama.bench, run as processes of their own.

    python -m hvd_llama.bench.prepare_steps rusage --json OUT -- COMMAND ...   # wall time and peak memory of COMMAND
    python -m hvd_llama.bench.prepare_steps encode --json OUT --tokenizer MODEL --mb 32 --folder DIR

`rusage` is a fresh parent, so getrusage(RUSAGE_CHILDREN) sees only COMMAND and its own children (ru_maxrss
is the largest single process among them). `encode` compares SentencePiece's own single-process encoding with
prepare's encode_batches in one process and in a pool of workers. This module imports no torch: the pool's
spawned workers import it again, and should start as fast as prepare's own.
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

from hvd_llama.bench.common import best_seconds
from hvd_llama.bench.synthetic import unique_documents
from hvd_llama.cli import UserError, run_main
from hvd_llama.files import atomic_write_text
from hvd_llama.prep.encode import ENCODE_BATCH_BYTES, batch_ranges, encode_batches, start_encoding_server
from hvd_llama.prep.token_shards import token_dtype
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


MEASUREMENTS = {"rusage": measure_rusage, "encode": measure_encode}


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
    parser.add_argument("--folder", type=Path, help="encode: where the temporary document store goes")
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
