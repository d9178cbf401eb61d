"""What a prepare run is asked to do, in dataclasses grouped as its --help groups them: the command's front end
(prepare.py) fills them from argparse, and everything in prep/ takes them."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from hvd_llama.prep.text import DEFAULT_CLEAN

MB = 1e6


@dataclass(frozen=True)
class InputOptions:
    paths: tuple[str, ...]  # --input: files, folders, or "stdlib"
    include: tuple[str, ...]  # globs read from folders
    exclude: tuple[str, ...] = ()
    text_field: str = "text"  # JSON-lines field / Parquet column holding a document's text
    max_docs: Optional[int] = None  # keep the first this many documents (examples) after deduplication
    max_chars: Optional[int] = None  # keep documents until this many characters are kept


@dataclass(frozen=True)
class SFTOptions:
    prompt_field: str = "prompt"
    response_field: str = "response"


@dataclass(frozen=True)
class CleanOptions:
    steps: tuple[str, ...] = DEFAULT_CLEAN
    unicode_form: str = "NFC"
    min_chars: int = 32

    @property
    def dedup(self) -> bool:
        return "dedup" in self.steps


@dataclass(frozen=True)
class TokenizerOptions:
    vocab_size: int = 4096  # of a tokenizer trained here
    path: Optional[str] = None  # an existing SentencePiece model instead
    sentences: int = 100_000  # line chunks sampled to train it


@dataclass(frozen=True)
class OutputOptions:
    out: str
    overwrite: bool = False
    val_fraction: float = 0.1
    shard_tokens: int = 100_000_000
    part_mb: float = 256.0  # input per part: the unit of work, of resumption and of shard files


@dataclass(frozen=True)
class WorkOptions:
    """How the work is done, not what comes out: a run may be resumed with other values."""
    workers: Optional[int] = None  # encoding processes per rank (None: the rank's share of the node's cores)
    memory_mb: float = 1024.0  # the deduplication table of one bucket of hashes


@dataclass(frozen=True)
class PrepareOptions:
    inputs: InputOptions
    output: OutputOptions
    clean: CleanOptions = field(default_factory=CleanOptions)
    tokenizer: TokenizerOptions = field(default_factory=TokenizerOptions)
    work: WorkOptions = field(default_factory=WorkOptions)
    sft: Optional[SFTOptions] = None  # fine-tuning examples instead of documents

    def identity(self) -> dict:
        """The settings that decide the output: a run resumes only a staging folder of the same identity."""
        settings = asdict(self)
        del settings["work"]
        del settings["output"]["overwrite"]
        return settings

    @property
    def drop_copies(self) -> bool:
        """Whether a document (or example) seen before is dropped: with the --clean step dedup, and always for
        fine-tuning rows."""
        return self.clean.dedup or self.sft is not None

    def columns(self) -> dict[str, str]:
        """The record fields read (JSON-lines fields, Parquet columns), each with the option that names it."""
        if self.sft:
            return {self.sft.prompt_field: "--prompt-field", self.sft.response_field: "--response-field"}
        return {self.inputs.text_field: "--text-field"}
