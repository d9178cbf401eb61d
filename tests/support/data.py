"""The tests' text and prepared data: the standard library's sources as a corpus, generated documents, prepare in
this process or as a command, and what a prepared folder holds."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from hvd_llama import prepare
from hvd_llama.prep.sources import stdlib_files
from hvd_llama.prep.text import document_hash
from hvd_llama.prep.token_shards import HEADER_BYTES, read_shard_header
from hvd_llama.tokenizer import Tokenizer

# Tiny Shakespeare's size: text enough for a 512-piece tokenizer and a 110,000-character validation split, prepared
# in about 2 s.
CORPUS_CHARS = 1_100_000


def stdlib_text(chars: int) -> str:
    """The first `chars` characters of the running Python's standard-library sources, concatenated in the order
    `prepare --input stdlib` reads them: text every machine with Python has, the same on every run."""
    parts, total = [], 0
    for path in stdlib_files():
        if total >= chars:
            break
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(parts[-1])
    return "".join(parts)[:chars]


def run_prepare(*args, workers: int = 1) -> dict:
    """prepare.prepare (the command without its process) with these arguments and `workers` encoding workers;
    returns the meta it wrote."""
    return prepare.prepare([str(a) for a in args] + ["--workers", str(workers)])


WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega caf\u00e9 na\u00efve \u00fcber \u65e5\u672c").split()


def make_document(i: int) -> str:
    """A distinct, somewhat varied document: prose with non-ASCII words, or indented code."""
    words = " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(40 + i))
    if i % 3 == 0:
        return (f"def function_{i}(x):\n    total = {i * 1234}\n    for v in x:\n"
                f"        total += v  # {words[:40]}\n    return total\n")
    return f"Document {i}: {words}.\r\nSecond line   with  spaces \u00a0\n\n\n\n\nEnd of {i}.\x00\n"


def split_tokens(data_dir: Path, split: str) -> np.ndarray:
    meta = json.loads((data_dir / "meta.json").read_text())
    arrays = []
    for shard in meta["splits"][split]["shards"]:
        dtype, n = read_shard_header(data_dir / shard["file"])
        arrays.append(np.fromfile(data_dir / shard["file"], dtype=dtype, offset=HEADER_BYTES))
        assert len(arrays[-1]) == n == shard["tokens"]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint16)


def decode_documents(data_dir: Path, split: str) -> list[str]:
    """The split's documents: each stored as [bos] + tokens + [eos]."""
    tok = Tokenizer(data_dir / "tokenizer.model")
    tokens = split_tokens(data_dir, split).tolist()
    starts = [i for i, t in enumerate(tokens) if t == tok.bos_id]
    ends = [i for i, t in enumerate(tokens) if t == tok.eos_id]
    assert len(starts) == len(ends) and starts[:1] == [0] and ends[-1:] == [len(tokens) - 1]
    return [tok.decode(tokens[s + 1:e]) for s, e in zip(starts, ends)]


def expected_document_split(docs: list[str], fraction=0.1) -> tuple[list[str], list[str]]:
    n_val = max(1, round(len(docs) * fraction))
    val_ids = set(sorted(range(len(docs)), key=lambda i: (document_hash(docs[i]), i))[:n_val])
    return [d for i, d in enumerate(docs) if i not in val_ids], [d for i, d in enumerate(docs) if i in val_ids]


def flip_token(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 10] ^= 1
    path.write_bytes(bytes(data))


def flip_token_keeping_size_and_mtime(path: Path) -> None:
    """Corrupt a shard in a way a stat cannot see: only its checksum tells."""
    stat = path.stat()
    flip_token(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvd_llama.prepare", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def assert_one_line_error(result, pattern):
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(f"error: .*{pattern}.*", last), last
    assert "Traceback" not in result.stderr
