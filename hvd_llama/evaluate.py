"""Score a checkpoint on held-out text: loss per token, perplexity, nats per character and bits per byte.

    python -m hvd_llama.evaluate --checkpoint runs/tiny                  # val split of the run's data folder
    horovodrun -np 4 python -m hvd_llama.evaluate --checkpoint runs/tiny --text book.txt --json eval.json

Every token is scored exactly once, by compute.score, the function behind training's validation. The token
stream (documents as [bos] + tokens + [eos], as prepare writes them) is cut into non-overlapping windows of
seq_len predictions plus a final partial window, and each window predicts its tokens from the ones before
them in the same window. A fine-tuning data folder is scored as training validates it: the responses only. So the figures are sums over the whole text:
nats/char = total loss / characters, bits/byte = total loss / ln 2 / UTF-8 bytes (the loss of the EOS and BOS
tokens between documents is included: it is part of modelling the text).

Under horovodrun or mpirun, batches of windows go to the ranks by stride and the sums travel in float64, so any
number of ranks gives the figures of one process (to rounding of the final sum). Each rank loads the
checkpoint. Started without a launcher, it is one process and Horovod is not even imported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from hvd_llama.cli import UserError, run_main
from hvd_llama.config import PRECISIONS, DistConfig, TrainConfig
from hvd_llama.device import resolve_device
from hvd_llama.files import atomic_write_text
from hvd_llama.prep.corpus import read_documents
from hvd_llama.procs import HOROVOD_LAUNCHERS, OneProcess
from hvd_llama.tokenizer import Tokenizer
from hvd_llama.training.compute import score
from hvd_llama.training.data import SPLITS, ArrayWindows, open_split, read_meta
from hvd_llama.use.inference import DTYPES, QUANTIZE_CHOICES, check_dtype, load_model, require_tokenizer


@dataclass
class Scored:
    """What to score: items (windows of a token stream, or fine-tuning rows) and the size of their text."""
    name: str
    items: Dataset
    characters: Optional[int]  # None: not known (fine-tuning rows score responses only)
    utf8_bytes: Optional[int]  # None: counted from the scored tokens with byte_lengths
    byte_lengths: Optional[np.ndarray] = None


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for in decoded text: 1 for a byte-fallback piece, 0 for control,
    unknown and unused ids, else its piece's bytes with the whitespace marker U+2581 read as a space.

    Summed over a token stream, this is the byte length of its text whenever decoding is lossless, as it is
    with prepare's tokenizers (no normalisation, no dummy prefix, byte fallback); only a literal U+2581 in
    the text would be counted as 1 byte instead of 3.
    """
    sp = tokenizer.sp
    lengths = np.zeros(sp.vocab_size(), dtype=np.int64)
    for i in range(sp.vocab_size()):
        if sp.is_byte(i):
            lengths[i] = 1
        elif not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
            lengths[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return lengths


def text_file_items(path: Path, tokenizer: Tokenizer, seq_len: int) -> Scored:
    """A text file (one document), or JSON lines (one document per line's "text"), optionally gzipped."""
    docs = [text for text, _, _ in read_documents(path, "text")]
    characters = sum(len(d) for d in docs)
    if characters == 0:
        raise UserError(f"--text {path} holds no text to score")
    tokens = np.array([t for d in docs for t in tokenizer.encode(d, bos=True, eos=True)], dtype=np.int64)
    return Scored(str(path), ArrayWindows(tokens, seq_len), characters, sum(len(d.encode("utf-8")) for d in docs))


def data_split_items(data_dir: Path, split: str, tokenizer: Optional[Tokenizer], seq_len: int,
                     verify: bool = False) -> Scored:
    """A split of a prepared data folder, scored as training's validation scores it. Characters come from
    meta.json; bytes are counted from the tokens (see token_byte_lengths), since meta.json does not record
    them. A fine-tuning folder scores the responses only (no character count)."""
    meta = read_meta(data_dir)
    if tokenizer is not None and meta.get("tokenizer_sha256") != tokenizer.sha256:
        raise UserError(f"{data_dir} was encoded with a different tokenizer than the checkpoint's "
                        f"{tokenizer.path}; evaluate on data prepared with --tokenizer {tokenizer.path}")
    if meta["splits"][split]["tokens"] < 2:
        raise UserError(f"the {split} split of {data_dir} holds no text to score (prepare it with --val-fraction > 0)")
    items = open_split(data_dir, split, seq_len, verify, scoring=True)
    characters = None if meta["kind"] == "sft" else meta["splits"][split]["chars"]
    return Scored(f"{data_dir} ({split})", items, characters, None,
                  token_byte_lengths(Tokenizer(data_dir / meta["tokenizer"])))


def start_ranks(device_kind: str, threads: int):
    """(ranks, device): hvd_llama.parallel under horovodrun or mpirun, else OneProcess without Horovod."""
    if not any(rank in os.environ for _, rank, _ in HOROVOD_LAUNCHERS):
        if threads:
            torch.set_num_threads(threads)
        return OneProcess, torch.device(device_kind)
    from hvd_llama import parallel  # imported only under a launcher, so that one process never loads Horovod
    return parallel, parallel.init(DistConfig(threads_per_rank=threads), device_kind)


def figures(loss_sum: float, tokens: int, characters: Optional[int], utf8_bytes: int) -> dict:
    """The README's definitions: loss per token, its exp, and the total loss per character and per byte."""
    loss = loss_sum / tokens
    return {"loss_per_token": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "nats_per_char": loss_sum / characters if characters else None,
            "bits_per_byte": loss_sum / math.log(2) / utf8_bytes if utf8_bytes else None}


@dataclass
class EvaluateConfig:
    """The evaluate command's options: parse_args reads them from the flags (whose defaults these are)."""
    checkpoint: str  # checkpoint folder, run folder (newest checkpoint) or Hugging Face LLaMA folder
    data: Optional[str] = None  # prepared data folder; None (and no text): the checkpoint's data.dir
    text: Optional[str] = None  # a text file to score instead (.jsonl: one document per line's "text"; .gz ok)
    split: str = "val"  # the data folder's split: one of training.data.SPLITS
    batch_size: int = 8  # windows per forward pass on each rank
    seq_len: Optional[int] = None  # window length; None: the checkpoint's train.seq_len, else model.max_seq_len
    quantize: Optional[str] = None  # int8: dynamic int8 Linear layers (CPU); None: none
    dtype: str = "fp32"  # the weights' type, a key of inference.DTYPES
    precision: Optional[str] = None  # autocast as in training; None: the checkpoint's train.precision, else fp32
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads per rank; 0 = cores / ranks on this node
    verify_data: bool = False  # check every shard's checksum (else only shards changed since their last check)
    json_path: Optional[str] = None  # also write the figures to this JSON file (atomically)

    def validate(self) -> None:
        """What argparse cannot check, each as one line naming the flag; before any checkpoint is read."""
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be at least 1")
        if self.threads < 0:
            raise UserError(f"--threads {self.threads} must be >= 0")
        check_dtype(self.dtype, self.quantize)
        if self.text and not Path(self.text).is_file():
            raise UserError(f"--text {self.text} does not exist")


def parse_args(argv: Optional[Sequence[str]]) -> EvaluateConfig:
    parser = argparse.ArgumentParser(
        prog="python -m hvd_llama.evaluate", description=__doc__.split("\n\n")[0],
        argument_default=argparse.SUPPRESS,  # a flag left out is not set: the config dataclass's default holds
        epilog="Example: horovodrun -np 2 -H localhost:2 python -m hvd_llama.evaluate --checkpoint runs/tiny "
               "--json runs/tiny/eval.json")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder, run folder (newest checkpoint) or Hugging Face LLaMA folder")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="prepared data folder (default: the checkpoint's data.dir)")
    source.add_argument("--text", help="text file to score (.jsonl: one document per line's \"text\"; .gz ok)")
    parser.add_argument("--split", choices=SPLITS, help="split of the data folder")
    parser.add_argument("--batch-size", type=int, help="windows per forward pass on each rank")
    parser.add_argument("--seq-len", type=int,
                        help="window length (default: the checkpoint's train.seq_len, else model.max_seq_len)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="dynamic int8 Linear layers (CPU)")
    parser.add_argument("--dtype", choices=tuple(DTYPES),
                        help="the weights' type: bf16 halves their memory (fast on GPUs, slow on most CPUs)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="autocast as in training (default: the checkpoint's train.precision, else fp32)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="CPU threads per rank; 0 = cores / ranks on this node")
    parser.add_argument("--verify-data", action="store_true",
                        help="check every shard's checksum (default: only shards whose size or time changed since "
                             "their last check)")
    parser.add_argument("--json", dest="json_path", metavar="OUT",
                        help="also write the figures to this JSON file (atomically)")
    cfg = EvaluateConfig(**vars(parser.parse_args(argv)))
    cfg.validate()
    return cfg


def default_data_dir(config: dict) -> Path:
    data_dir = (config.get("data") or {}).get("dir")
    if not data_dir or not (Path(data_dir) / "meta.json").is_file():
        raise UserError(f"no --data or --text given, and the checkpoint's data.dir ({data_dir or 'not recorded'}) "
                        "is not a prepared data folder here; pass --data DIR or --text FILE")
    return Path(data_dir)


def pick_seq_len(requested: Optional[int], config: dict, max_seq_len: int) -> int:
    seq_len = requested or min((config.get("train") or {}).get("seq_len") or max_seq_len, max_seq_len)
    if not 1 <= seq_len <= max_seq_len:
        raise UserError(f"--seq-len {seq_len} must be between 1 and the model's max_seq_len {max_seq_len}")
    return seq_len


def evaluate(cfg: EvaluateConfig) -> dict:
    """Score cfg's text with cfg's checkpoint, print the figures on the main rank (and write cfg.json_path)."""
    ranks, device = start_ranks(resolve_device(cfg.device, "--device", cfg.quantize).type, cfg.threads)
    model, tokenizer, config = load_model(cfg.checkpoint, device, cfg.quantize, cfg.dtype)
    seq_len = pick_seq_len(cfg.seq_len, config, model.cfg.max_seq_len)
    if cfg.text:
        text = text_file_items(Path(cfg.text), require_tokenizer(tokenizer, cfg.checkpoint), seq_len)
    else:
        data_dir = Path(cfg.data) if cfg.data else default_data_dir(config)
        text = data_split_items(data_dir, cfg.split, tokenizer, seq_len, cfg.verify_data)
    precision = cfg.precision or (config.get("train") or {}).get("precision") or "fp32"
    start = time.perf_counter()
    sums = score(model, text.items, range(len(text.items)), cfg.batch_size, device, precision, text.byte_lengths,
                 ranks=ranks, progress=ranks.is_main() and sys.stderr.isatty(), loss_chunk=TrainConfig.loss_chunk)
    seconds = time.perf_counter() - start
    utf8_bytes = text.utf8_bytes if text.utf8_bytes is not None else sums["bytes"]
    result = {"checkpoint": str(cfg.checkpoint), "source": text.name, "tokens": sums["tokens"],
              "windows": sums["items"], "characters": text.characters, "bytes": utf8_bytes,
              **figures(sums["loss_sum"], sums["tokens"], text.characters, utf8_bytes),
              "loss_sum_nats": sums["loss_sum"], "seq_len": seq_len, "precision": precision, "dtype": cfg.dtype,
              "quantize": cfg.quantize or "none", "ranks": ranks.size(), "device": device.type, "seconds": seconds}
    ranks.run_on_main(lambda: report(result, cfg.json_path), name="evaluate.report")
    return result


def report(result: dict, json_path: Optional[str]) -> None:
    chars = f"{result['characters']:,} chars" if result["characters"] else "responses only"
    per_char = f" | {result['nats_per_char']:.4f} nats/char" if result["nats_per_char"] is not None else ""
    print(f"eval {result['source']}: {result['tokens']:,} tokens in {result['windows']:,} windows, {chars} | "
          f"loss {result['loss_per_token']:.4f} | ppl {result['perplexity']:.2f}{per_char} | "
          f"{result['bits_per_byte']:.4f} bits/byte | "
          f"{'int8' if result['quantize'] == 'int8' else result['precision'] + ', ' + result['dtype'] + ' weights'} | "
          f"{result['ranks']} rank(s) | "
          f"{result['tokens'] / max(result['seconds'], 1e-9):,.0f} tok/s", flush=True)
    if json_path:
        path = Path(json_path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        except OSError as err:
            raise UserError(f"cannot write --json {json_path}: {err}") from None


def _main(argv: Optional[Sequence[str]]) -> dict:
    return evaluate(parse_args(argv))


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(_main, argv)


if __name__ == "__main__":
    main()
