"""The `prepare` command: raw text -> tokenizer, token shards and meta.json (corpus.py reads and cleans the
inputs, encode.py encodes them, shards.py defines the files).

    python -m hvd_llama.prepare --input stdlib --out data/stdlib                 # pretraining ("kind": "pretrain")
    python -m hvd_llama.prepare --sft --input chat.jsonl --out data/chat        # fine-tuning ("kind": "sft")

writes DIR/{tokenizer.model, meta.json, train_0000.bin ..., val_0000.bin ...}. Everything is written into a
temporary folder next to DIR and renamed at the end, so DIR is either complete or untouched. Each document is
stored as [bos] + tokens + [eos]; documents are packed back to back, and a split may span several shards.

Supervised fine-tuning (--sft) reads JSON lines with a prompt and a response field. Each example is stored as
[bos] + encode(prompt) + encode(response) + [eos] in the same shards, and DIR/{split}_index.npy (int64
[examples, 3]) holds one row per example: start offset in the split's token stream, prompt length counting
bos, total length. The only cleaning is --unicode-form normalisation (NFC by default) and removal of control
characters other than tab, newline and carriage return; exact duplicate examples are dropped. Examples are
split by content hash like documents, whatever their number.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from hvd_llama.cli import UserError, run_main
from hvd_llama.files import atomic_write_text, staging_dir
from hvd_llama.prep.corpus import (
    DEFAULT_INCLUDE,
    MIN_DOCS_FOR_DOCUMENT_SPLIT,
    SFT_INCLUDE,
    STDLIB,
    Doc,
    DocumentStore,
    find_input_files,
    read_corpus,
    read_doc,
    read_examples,
    split_by_hash,
    split_corpus,
)
from hvd_llama.prep.encode import encode_example_splits, encode_splits, start_encoding_server
from hvd_llama.prep.text import CHAR_STEPS, CLEAN_STEPS, DEFAULT_CLEAN, Cleaner, parse_steps, sentence_chunks
from hvd_llama.prep.token_shards import META_FORMAT, META_VERSION, token_dtype
from hvd_llama.tokenizer import Tokenizer, train_tokenizer

TOKENIZER_SENTENCE_CHARS = 1000


# ------------------------------------------------------------------------------------------------ tokenizer

def sample_sentences(store_path: Path, docs: Sequence[Doc], max_sentences: int, seed: int = 0) -> list[str]:
    """A uniform random sample (reservoir sampling, fixed seed) of at most max_sentences line chunks."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    with open(store_path, "rb") as store:
        for doc in docs:
            for sentence in sentence_chunks(read_doc(store, doc), TOKENIZER_SENTENCE_CHARS):
                seen += 1
                if len(sample) < max_sentences:
                    sample.append(sentence)
                elif (j := rng.randrange(seen)) < max_sentences:
                    sample[j] = sentence
    return sample


def load_tokenizer(path: Path) -> Tokenizer:
    tokenizer = Tokenizer(path)
    if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
        raise UserError(f"--tokenizer {path} defines no bos/eos tokens (bos_id={tokenizer.bos_id}, "
                        f"eos_id={tokenizer.eos_id}); documents need both")
    return tokenizer



def make_tokenizer(args: argparse.Namespace, store_path: Path, train: Sequence[Doc], path: Path) -> Tokenizer:
    """Copy --tokenizer, or train one on a sample of the training split (never on validation text)."""
    if args.tokenizer is not None:
        shutil.copyfile(args.tokenizer, path)
    else:
        sentences = sample_sentences(store_path, train, args.tokenizer_sentences)
        print(f"training a {args.vocab_size}-piece tokenizer on {len(sentences):,} text chunks", file=sys.stderr)
        train_tokenizer(sentences, path, args.vocab_size, args.tokenizer_sentences, TOKENIZER_SENTENCE_CHARS)
    return load_tokenizer(path)



# ---------------------------------------------------------------------------------------------- output folder

def check_out_dir(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; expected a folder")
    if not any(out.iterdir()):
        return
    if not (out / "meta.json").is_file():
        raise UserError(f"--out {out} is a non-empty folder that does not hold a prepared corpus; choose another --out")
    if not overwrite:
        raise UserError(f"--out {out} already holds a prepared corpus; pass --overwrite to replace it")


# ------------------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hvd_llama.prepare", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Clean a text corpus (or, with --sft, read prompt/response examples), train a SentencePiece "
                    "BPE tokenizer and write memory-mappable token shards plus meta.json for hvd_llama.train.")
    files = parser.add_argument_group("input / output")
    files.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help=f"files or folders (plain text, source code, JSON lines; optionally .gz), or '{STDLIB}' "
                            "for this Python's standard library sources without tests (no download needed; write "
                            "./stdlib for a folder of that name)")
    files.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    files.add_argument("--overwrite", action="store_true", help="replace an existing prepared corpus in --out")
    files.add_argument("--include", nargs="+", default=argparse.SUPPRESS, metavar="GLOB",
                       help="file patterns read from folders, matched against the relative path and the name "
                            "(*.txt also matches a.txt.gz; hidden files and folders are skipped); default: "
                            f"{' '.join(DEFAULT_INCLUDE)}; with --sft: {' '.join(SFT_INCLUDE)}")
    files.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="file patterns skipped in folders")
    files.add_argument("--jsonl-field", default="text", help="field holding the text in JSON-lines records")
    files.add_argument("--max-docs", type=int, default=None,
                       help="stop after this many cleaned documents (--sft: examples)")
    files.add_argument("--max-chars", type=int, default=None, help="stop once this many cleaned characters are kept")
    sft = parser.add_argument_group(
        "supervised fine-tuning", "each example is stored as [bos] + prompt + response + [eos], with an index of "
        "where the response starts; cleaning is only --unicode-form and control characters (the --clean steps and "
        "--min-chars do not apply), and exact duplicates are dropped")
    sft.add_argument("--sft", action="store_true",
                     help="read every input file as JSON lines of prompt/response examples (optionally .gz)")
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
    choice.add_argument("--tokenizer", type=Path, default=None, metavar="FILE",
                        help="use this existing SentencePiece tokenizer.model instead of training one")
    tok.add_argument("--tokenizer-sentences", type=int, default=100_000,
                     help=f"train on at most this many sampled chunks of <= {TOKENIZER_SENTENCE_CHARS} characters")
    out = parser.add_argument_group("split and shards")
    out.add_argument("--val-fraction", type=float, default=0.1,
                     help=f"held-out fraction: of the documents (those with the smallest content hash) when there "
                          f"are at least {MIN_DOCS_FOR_DOCUMENT_SPLIT}, else the last characters of the text; "
                          "--sft: of the examples by content hash, at least one")
    out.add_argument("--shard-tokens", type=int, default=100_000_000, help="at most this many tokens per shard")
    out.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    try:
        args.clean = parse_steps(args.clean)
    except ValueError as err:
        raise UserError(f"--clean: {err}") from None
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    for name in ("shard_tokens", "workers", "tokenizer_sentences", "max_docs", "max_chars"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value} must be at least 1")
    if args.min_chars < 0:
        raise UserError(f"--min-chars {args.min_chars} must be >= 0")
    if args.sft and args.prompt_field == args.response_field:
        raise UserError(f"--prompt-field and --response-field are both {args.prompt_field!r}; they must differ")
    if "include" not in vars(args):  # the default depends on --sft
        args.include = list(SFT_INCLUDE if args.sft else DEFAULT_INCLUDE)
    if args.tokenizer is not None:
        load_tokenizer(args.tokenizer)  # fail before reading the corpus


def prepare(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the whole pipeline for a command line; returns meta.json's content."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    validate_args(args)
    start_encoding_server(args.workers)
    out = args.out
    check_out_dir(out, args.overwrite)
    files = find_input_files(args.input, args.include, args.exclude)
    with staging_dir(out) as tmp:  # an old corpus is replaced only after the new one is complete
        build = build_examples if args.sft else build_corpus
        meta = build(args, files, tmp, command=shlex.join(["python", "-m", "hvd_llama.prepare", *argv]))
        check_out_dir(out, args.overwrite)  # something may have appeared there meanwhile
    print_report(meta, out)
    return meta


def build_corpus(args: argparse.Namespace, files: Sequence[Path], folder: Path, command: str) -> dict:
    start = time.perf_counter()
    store = DocumentStore(folder / "documents.tmp")
    cleaner = Cleaner(args.clean, args.unicode_form, args.min_chars)
    try:
        docs, hashes, inputs = read_corpus(files, store, cleaner, args)
    finally:
        store.close()
    if not docs:
        dropped = ", ".join(f"{step}: {r['documents']}" for step, r in cleaner.report.items()
                            if r["documents"] and step not in CHAR_STEPS)
        raise UserError(f"the corpus is empty after cleaning: {inputs['documents']} documents read from "
                        f"{inputs['files']} files, all dropped ({dropped or 'no text'})")
    train, val, split_method = split_corpus(docs, hashes, args.val_fraction, store.path)
    if not train or (args.val_fraction > 0 and not val):
        raise UserError(f"the corpus ({sum(d.chars for d in docs)} characters) is too small to hold out "
                        f"--val-fraction {args.val_fraction}")

    tokenizer = make_tokenizer(args, store.path, train, folder / "tokenizer.model")
    dtype = token_dtype(tokenizer.vocab_size)
    splits = encode_splits({"train": train, "val": val}, tokenizer.path, store.path, dtype, folder,
                           args.shard_tokens, args.workers)
    store.path.unlink()
    return write_meta(folder, "pretrain", tokenizer, dtype, args, command, start,
                      split_method=split_method, val_fraction=args.val_fraction, splits=splits, inputs=inputs,
                      cleaning={"steps": list(args.clean), "unicode_form": args.unicode_form,
                                "min_chars": args.min_chars, "removed": cleaner.report})


def build_examples(args: argparse.Namespace, files: Sequence[Path], folder: Path, command: str) -> dict:
    """--sft: prompt/response examples -> shards, per-split example index, meta.json of kind "sft"."""
    start = time.perf_counter()
    store = DocumentStore(folder / "documents.tmp")
    try:
        examples, hashes, inputs, cleaning = read_examples(files, store, args)
    finally:
        store.close()
    if not examples:
        raise UserError(f"no fine-tuning examples in {inputs['files']} file(s) ({inputs['bytes']:,} bytes): --sft "
                        f"needs JSON lines with {args.prompt_field!r} and {args.response_field!r} fields")
    train, val = split_by_hash(examples, hashes, args.val_fraction)
    if not train:
        raise UserError(f"{len(examples)} example(s) are too few to hold out --val-fraction {args.val_fraction}; "
                        "add examples or use --val-fraction 0")

    tokenizer = make_tokenizer(args, store.path, [doc for example in train for doc in example],
                               folder / "tokenizer.model")
    dtype = token_dtype(tokenizer.vocab_size)
    splits = encode_example_splits({"train": train, "val": val}, tokenizer.path, store.path, dtype, folder,
                                   args.shard_tokens, args.workers)
    store.path.unlink()
    return write_meta(folder, "sft", tokenizer, dtype, args, command, start,
                      split_method="examples", val_fraction=args.val_fraction, splits=splits, inputs=inputs,
                      cleaning={"steps": ["unicode", "control"], "unicode_form": args.unicode_form, **cleaning},
                      sft={"prompt_field": args.prompt_field, "response_field": args.response_field})


def write_meta(folder: Path, kind: str, tokenizer: Tokenizer, dtype: np.dtype, args: argparse.Namespace,
               command: str, start: float, **fields) -> dict:
    """meta.json: what every data folder records, the builder's `fields`, then how it was made."""
    meta = {
        "format": META_FORMAT, "format_version": META_VERSION, "kind": kind,
        "vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
        "unk_id": tokenizer.unk_id, "tokenizer": tokenizer.path.name, "tokenizer_sha256": tokenizer.sha256,
        "tokenizer_trained": args.tokenizer is None,
        **fields,
        "command": command,
        "settings": json.loads(json.dumps(vars(args), default=str)),
        "python": platform.python_version(), "seconds": round(time.perf_counter() - start, 3),
    }
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def print_report(meta: dict, folder: Path) -> None:
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
    seconds = max(meta["seconds"], 1e-3)
    print(f"prepared {count:,} {unit}, {chars:,} characters -> {tokens:,} tokens "
          f"({chars / tokens:.2f} characters/token) in {seconds:.1f} s "
          f"({inputs['bytes'] / 1e6 / seconds:.2f} MB/s) -> {folder}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(prepare, argv)


if __name__ == "__main__":
    main()
