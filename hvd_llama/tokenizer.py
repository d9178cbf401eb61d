"""SentencePiece BPE tokenizer: training with lossless settings, and a thin wrapper for encode/decode."""
from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from hvd_llama.cli import UserError
from hvd_llama.files import atomic_write_bytes, sha256_file

# Settings that make decode(encode(text)) == text for any text, code whitespace included: no normalisation,
# no dummy prefix, spaces kept as they are, unknown characters spelled out as UTF-8 byte pieces.
SENTENCEPIECE_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    normalization_rule_name="identity",
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    shuffle_input_sentence=True,
)


class Tokenizer:
    """A SentencePiece model file; raises UserError when the file is missing or is not one."""

    def __init__(self, model_path: str | os.PathLike):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise UserError(f"tokenizer file {self.path} does not exist")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as err:
            raise UserError(f"{self.path} is not a SentencePiece model ({err})") from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()
        self.unk_id = self.sp.unk_id()
        self.sha256 = sha256_file(self.path)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.encode(text) + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def train_tokenizer(sentences: Iterable[str], out_path: str | os.PathLike, vocab_size: int = 4096,
                    max_sentences: int = 100_000, max_sentence_chars: int = 1000,
                    num_threads: int | None = None) -> Path:
    """Train a SentencePiece BPE model on `sentences` (SentencePiece keeps a random sample of at most
    max_sentences of them, so memory stays bounded) and write it atomically to out_path."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            input_sentence_size=max_sentences, max_sentence_length=4 * max_sentence_chars + 16,  # bytes
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2, **SENTENCEPIECE_OPTIONS)
    except RuntimeError as err:
        raise UserError(_explain_training_error(str(err), vocab_size)) from None
    atomic_write_bytes(out_path, model.getvalue())
    return Path(out_path)


def _explain_training_error(message: str, vocab_size: int) -> str:
    if match := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message):
        return (f"--vocab-size {vocab_size} is larger than this corpus supports: SentencePiece found at most "
                f"{match.group(1)} distinct pieces; use --vocab-size {match.group(1)} or less, or more text")
    if match := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        return (f"--vocab-size {vocab_size} is too small: this corpus needs at least {match.group(1)} pieces "
                f"(256 byte pieces, special tokens and its common characters)")
    return f"SentencePiece could not train a {vocab_size}-piece tokenizer: {message.splitlines()[-1]}"
