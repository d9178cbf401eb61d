"""The tests' text and prepared data: the standard library's sources as a corpus, and prepare in this process."""
from hvd_llama import prepare
from hvd_llama.prep.sources import stdlib_files

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
