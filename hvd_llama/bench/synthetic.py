"""A corpus of any size for the data-preparation benchmark, made from this Python's standard library (no
download, no torch: prepare_steps' encoding workers import this module too)."""
from __future__ import annotations

import itertools
import json
import sysconfig
from pathlib import Path
from typing import Iterator

from hvd_llama.prep.sources import stdlib_files


def unique_documents() -> Iterator[str]:
    """Python's standard library sources over and over, each copy under a header line of its own, so that
    prepare's exact deduplication keeps every copy."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = [(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8", errors="replace"))
               for p in stdlib_files()]
    for copy in itertools.count():
        for name, text in sources:
            yield f"# copy {copy} of {name}\n{text}"


def write_corpus(path: Path, n_bytes: int) -> int:
    """A JSON-lines corpus of at least n_bytes (one document per line); returns its size in bytes."""
    written = 0
    with open(path, "w", encoding="ascii") as f:
        for text in unique_documents():
            line = json.dumps({"text": text}) + "\n"  # ASCII only (escaped), so characters == bytes
            f.write(line)
            written += len(line)
            if written >= n_bytes:
                return written
    raise AssertionError("unreachable: unique_documents never ends")
