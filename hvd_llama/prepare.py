"""The `prepare` command: raw text -> tokenizer, token shards and meta.json, in one process or on every rank of a
job (the steps: prep/build.py).

    python -m hvd_llama.prepare --input stdlib --out data/stdlib                 # pretraining ("kind": "pretrain")
    python -m hvd_llama.prepare --sft --input chat.jsonl --out data/chat        # fine-tuning ("kind": "sft")
    horovodrun -np 16 -H node1:8,node2:8 python -m hvd_llama.prepare --input /shared/fineweb --out /shared/fw

writes DIR/{tokenizer.model, meta.json, verified.json, train_00000_0000.bin ..., val_00000_0000.bin ...}. The ranks
work in a staging folder next to DIR (on a filesystem they share) that becomes DIR at the end, so DIR is either
complete or untouched; an interrupted run (Ctrl-C, SIGTERM, a crash, a lost node) leaves the staging folder, and
the same command run again continues from the parts it had finished. Each document is stored as [bos] + tokens +
[eos]; documents are packed back to back, and a split may span several shards.

Supervised fine-tuning (--sft) reads JSON lines (or Parquet rows) with a prompt and a response field. Each example
is stored as [bos] + encode(prompt) + encode(response) + [eos] in the same shards, and DIR/{split}_index.npy (int64
[examples, 3]) holds one row per example: start offset in the split's token stream, prompt length counting bos,
total length. The only cleaning is --unicode-form normalisation (NFC by default) and removal of control
characters other than tab, newline and carriage return; exact duplicate examples are dropped. Examples are
split by content hash like documents, whatever their number.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from typing import Optional, Sequence

from hvd_llama.cli import UserError, run_main
from hvd_llama.prep.build import build
from hvd_llama.prep.encode import start_encoding_server
from hvd_llama.prep.settings import (
    CleanOptions,
    InputOptions,
    OutputOptions,
    PrepareOptions,
    SFTOptions,
    TokenizerOptions,
    WorkOptions,
)
from hvd_llama.prep.sources import DEFAULT_INCLUDE, SFT_INCLUDE, STDLIB
from hvd_llama.prep.split import MIN_DOCS_FOR_DOCUMENT_SPLIT
from hvd_llama.prep.staging import Staging
from hvd_llama.prep.text import CHAR_STEPS, CLEAN_STEPS, DEFAULT_CLEAN, parse_steps
from hvd_llama.prep.vocabulary import TOKENIZER_SENTENCE_CHARS, load_tokenizer
from hvd_llama.procs import LAUNCHER_ENV, OneProcess, say


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hvd_llama.prepare", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Clean a text corpus (or, with --sft, read prompt/response examples), train a SentencePiece "
                    "BPE tokenizer and write memory-mappable token shards plus meta.json for hvd_llama.train. Under "
                    "horovodrun, mpirun or srun every rank does a share, with the same result as one process.")
    files = parser.add_argument_group("input / output")
    files.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help="files or folders (plain text, source code, JSON lines, Parquet; text and JSON lines "
                            f"optionally .gz or .zst), or '{STDLIB}' for this Python's standard library sources "
                            "without tests (no download needed; write ./stdlib for a folder of that name)")
    files.add_argument("--out", required=True, metavar="DIR", help="output folder")
    files.add_argument("--overwrite", action="store_true", help="replace an existing prepared corpus in --out")
    files.add_argument("--include", nargs="+", default=argparse.SUPPRESS, metavar="GLOB",
                       help="file patterns read from folders, matched against the relative path and the name "
                            "(*.txt also matches a.txt.gz and a.txt.zst; hidden files and folders are skipped); "
                            f"default: {' '.join(DEFAULT_INCLUDE)}; with --sft: {' '.join(SFT_INCLUDE)}")
    files.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="file patterns skipped in folders")
    files.add_argument("--text-field", "--jsonl-field", dest="text_field", default="text",
                       help="JSON-lines field or Parquet column holding a document's text")
    files.add_argument("--max-docs", type=int, default=None,
                       help="keep the first this many distinct documents (--sft: examples)")
    files.add_argument("--max-chars", type=int, default=None,
                       help="keep documents until this many cleaned characters are kept")
    sft = parser.add_argument_group(
        "supervised fine-tuning", "each example is stored as [bos] + prompt + response + [eos], with an index of "
        "where the response starts; cleaning is only --unicode-form and control characters (the --clean steps and "
        "--min-chars do not apply), and exact duplicates are dropped")
    sft.add_argument("--sft", action="store_true",
                     help="read every input file as JSON lines (or Parquet) of prompt/response examples")
    sft.add_argument("--prompt-field", default="prompt", help="field holding the prompt in --sft records")
    sft.add_argument("--response-field", default="response", help="field holding the response in --sft records")
    clean = parser.add_argument_group("cleaning")
    clean.add_argument("--clean", default=",".join(DEFAULT_CLEAN),
                       help=f"comma-separated steps from {','.join(CLEAN_STEPS)}, or 'none'. html is off by "
                            "default because it would damage source code; use it for scraped web text")
    clean.add_argument("--unicode-form", choices=("NFC", "NFKC"), default="NFC", help="normal form of 'unicode'")
    clean.add_argument("--min-chars", type=int, default=32, help="'short' drops documents shorter than this")
    tok = parser.add_argument_group("tokenizer")
    choice = tok.add_mutually_exclusive_group()
    choice.add_argument("--vocab-size", type=int, default=4096, help="train a tokenizer of this many pieces")
    choice.add_argument("--tokenizer", default=None, metavar="FILE",
                        help="use this existing SentencePiece tokenizer.model instead of training one")
    tok.add_argument("--tokenizer-sentences", type=int, default=100_000,
                     help=f"train on at most this many line chunks of <= {TOKENIZER_SENTENCE_CHARS} characters, "
                          "from training documents drawn at random (by content hash)")
    out = parser.add_argument_group("split and shards")
    out.add_argument("--val-fraction", type=float, default=0.1,
                     help=f"held-out fraction: of the documents (those with the smallest content hash) when there "
                          f"are at least {MIN_DOCS_FOR_DOCUMENT_SPLIT}, else the last characters of the text; "
                          "--sft: of the examples by content hash, at least one")
    out.add_argument("--shard-tokens", type=int, default=100_000_000, help="at most this many tokens per shard")
    out.add_argument("--part-mb", type=float, default=256.0,
                     help="input per part (files are grouped, large JSON-lines files cut, Parquet cut at row "
                          "groups): the unit ranks share, a re-run resumes, and shards are written per")
    work = parser.add_argument_group("resources (a re-run may change them)")
    work.add_argument("--workers", type=int, default=None,
                      help="encoding processes per rank (default: the node's cores / its ranks)")
    work.add_argument("--memory-mb", type=float, default=1024.0,
                      help="memory for deduplication: the hashes are spilled to disk and merged in buckets of this "
                           "size")
    return parser


def read_options(args: argparse.Namespace) -> PrepareOptions:
    """The options of a command line, checked."""
    try:
        steps = parse_steps(args.clean)
    except ValueError as err:
        raise UserError(f"--clean: {err}") from None
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    for name in ("shard_tokens", "workers", "max_docs", "max_chars"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value} must be at least 1")
    if args.tokenizer_sentences <= 100:
        raise UserError(f"--tokenizer-sentences {args.tokenizer_sentences} must be more than 100 (SentencePiece's "
                        "least)")
    for name in ("part_mb", "memory_mb"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be positive")
    if args.min_chars < 0:
        raise UserError(f"--min-chars {args.min_chars} must be >= 0")
    if args.sft and args.prompt_field == args.response_field:
        raise UserError(f"--prompt-field and --response-field are both {args.prompt_field!r}; they must differ")
    if args.tokenizer is not None:
        load_tokenizer(args.tokenizer)  # fail before reading the corpus
    include = args.include if "include" in vars(args) else (SFT_INCLUDE if args.sft else DEFAULT_INCLUDE)
    return PrepareOptions(
        InputOptions(tuple(args.input), tuple(include), tuple(args.exclude), args.text_field, args.max_docs,
                     args.max_chars),
        OutputOptions(os.path.abspath(args.out), args.overwrite, args.val_fraction, args.shard_tokens, args.part_mb),
        CleanOptions(steps, args.unicode_form, args.min_chars),
        TokenizerOptions(args.vocab_size, args.tokenizer and os.path.abspath(args.tokenizer), args.tokenizer_sentences),
        WorkOptions(args.workers, args.memory_mb),
        SFTOptions(args.prompt_field, args.response_field) if args.sft else None)


def start_ranks():
    """(ranks, ranks on this node): hvd_llama.parallel when a launcher started several processes, else one
    process that never imports Horovod. srun without MPI (--mpi=pmix) fails there in one line."""
    if not any(os.environ.get(size, "").isdigit() and int(os.environ[size]) > 1 for _, _, size in LAUNCHER_ENV):
        return OneProcess, 1
    os.environ.setdefault("HOROVOD_STALL_CHECK_DISABLE", "1")  # ranks wait minutes for each other's share: no stall
    # Imported only under a launcher: one process never loads Horovod, and encoding workers (which import this
    # module as their __main__'s) never load torch.
    from hvd_llama import parallel
    from hvd_llama.config import DistConfig
    parallel.init(DistConfig(threads_per_rank=1), "cpu")
    return parallel, parallel.local_size()


def _stop(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a scheduler's preemption, the launcher's stop) stops as Ctrl-C does


def prepare(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the whole pipeline for a command line; returns meta.json's content."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = read_options(build_parser().parse_args(argv))
    ranks, local_ranks = start_ranks()
    workers = options.work.workers or max(1, (os.cpu_count() or 1) // local_ranks)
    start_encoding_server(workers)
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        meta = build(options, ranks, workers, shlex.join(["python", "-m", "hvd_llama.prepare", *argv]))
    except KeyboardInterrupt:
        say(f"prepare stopped; what it finished is kept in {Staging(options.output.out).root}: run the same "
            "command again to continue")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if ranks.rank() == 0:
        print_report(meta, options.output.out)
    return meta


def print_report(meta: dict, folder: str) -> None:
    sft = meta["kind"] == "sft"
    unit = "examples" if sft else "documents"
    cleaning = meta["cleaning"]
    if sft:
        print(f"clean: {cleaning['changed']:,} examples changed ({cleaning['unicode_form']}, control characters), "
              f"{cleaning['duplicates']:,} duplicates dropped")
    else:
        for step, removed in cleaning["removed"].items():
            verb = "changed" if step in CHAR_STEPS else "dropped"
            print(f"clean {step}: {removed['documents']:,} documents {verb}, {removed['chars']:,} characters removed")
    inputs = meta["inputs"]
    if inputs["undecodable_bytes"]:
        print(f"warning: {inputs['undecodable_bytes']:,} undecodable bytes in {inputs['files_with_undecodable_bytes']} "
              "files were replaced by U+FFFD")
    for name, split in meta["splits"].items():
        tokens = (f"{split['prompt_tokens']:,} prompt + {split['response_tokens']:,} response tokens" if sft
                  else f"{split['tokens']:,} tokens")
        print(f"{name}: {split[unit]:,} {unit}, {split['chars']:,} characters, {tokens}, "
              f"{len(split['shards'])} shard file(s)")
    count = sum(s[unit] for s in meta["splits"].values())
    chars = sum(s["chars"] for s in meta["splits"].values())
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    seconds, work = max(meta["seconds"], 1e-3), meta["work"]
    workers = f" + {work['worker_peak_rss_bytes'] / 1e6:.0f} MB per worker" if work["worker_peak_rss_bytes"] else ""
    print(f"prepared {count:,} {unit}, {chars:,} characters -> {tokens:,} tokens "
          f"({chars / tokens:.2f} characters/token) in {seconds:.1f} s ({inputs['bytes'] / 1e6 / seconds:.2f} MB/s, "
          f"{work['ranks']} rank(s) x {work['workers_per_rank']} worker(s)), peak RSS "
          f"{work['peak_rss_bytes'] / 1e6:.0f} MB per rank{workers} -> {folder}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(prepare, argv)


if __name__ == "__main__":
    main()
