"""Text cleaning: small pure functions, one per step, and a Cleaner that applies them and keeps a report.

Character-level steps run in a fixed order (html, unicode, control, whitespace), then the document-level
steps decide whether the document is kept: short here, dedup (exact duplicates, by document_hash) across the
whole corpus in prep/dedup.py. None of the default steps touches leading indentation or spacing inside a line,
so source code survives cleaning unchanged apart from line endings and trailing whitespace. `html` is off by
default: it would eat `a<b and c>d` in code; turn it on for scraped web text.
"""
from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from typing import Iterable, Iterator, Optional

CHAR_STEPS = ("html", "unicode", "control", "whitespace")
DOC_STEPS = ("short", "dedup")
CLEAN_STEPS = CHAR_STEPS + DOC_STEPS
DEFAULT_CLEAN = ("unicode", "control", "whitespace", "short", "dedup")

_HTML_HIDDEN = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
_HTML_LINE_BREAK = re.compile(r"<(?:br|/p|/div|/li|/tr|/h[1-6])\b[^<>]*>", re.IGNORECASE)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>")
# C0 and C1 control characters except tab, newline and carriage return (line endings are the whitespace
# step's job), plus the byte-order mark / zero-width no-break space.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")
_LINE_END = re.compile(r"\r\n?|[\u2028\u2029]")
_ODD_SPACE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


def strip_html(text: str) -> str:
    """Drop scripts, styles, comments and tags (block ends become newlines), then decode entities."""
    text = _HTML_HIDDEN.sub("", text)
    text = _HTML_LINE_BREAK.sub("\n", text)
    text = _HTML_TAG.sub("", text)
    return html.unescape(text)


def normalize_unicode(text: str, form: str = "NFC") -> str:
    """NFC merges combining sequences; NFKC also folds compatibility forms (ligatures, full-width, NBSP)."""
    if unicodedata.is_normalized(form, text):  # fast path: most text already is
        return text
    return unicodedata.normalize(form, text)


def remove_control_chars(text: str) -> str:
    return _CONTROL.sub("", text)


def normalize_whitespace(text: str, max_blank_lines: int = 2) -> str:
    """Unify line endings and odd spaces, strip trailing spaces and blank lines at both ends, and cap runs
    of blank lines. Leading indentation and spacing inside lines are kept: code depends on them."""
    text = _LINE_END.sub("\n", text)
    text = _ODD_SPACE.sub(" ", text)
    text = _TRAILING_SPACE.sub("", text)
    text = re.sub(r"\n{%d,}" % (max_blank_lines + 2), "\n" * (max_blank_lines + 1), text)
    text = _LEADING_BLANK_LINES.sub("", text)
    return text.rstrip()


def document_hash(text: str) -> bytes:
    """16-byte content hash, used for exact deduplication and the train/val split."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8 (a leading byte-order mark is dropped); undecodable bytes become U+FFFD.
    Returns the text and how many replacement characters decoding had to insert."""
    try:
        return data.decode("utf-8-sig"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8-sig", errors="replace")
        return text, text.count("\ufffd") - data.count("\ufffd".encode("utf-8"))


def sentence_chunks(text: str, max_chars: int) -> Iterator[str]:
    """Split text into runs of whole lines (newlines kept) of at most max_chars characters; longer lines
    are cut. Tokenizer training sees these, so pieces may learn newlines and indentation."""
    buffer: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if buffer and size + len(line) > max_chars:
            yield "".join(buffer)
            buffer, size = [], 0
        while len(line) > max_chars:
            yield line[:max_chars]
            line = line[max_chars:]
        buffer.append(line)
        size += len(line)
    if buffer:
        yield "".join(buffer)


def parse_steps(spec: str) -> tuple[str, ...]:
    """'unicode,whitespace' -> ('unicode', 'whitespace'); 'none' -> (); unknown names raise ValueError."""
    names = [] if spec.strip() in ("", "none") else [s.strip() for s in spec.split(",")]
    unknown = [n for n in names if n not in CLEAN_STEPS]
    if unknown:
        raise ValueError(f"unknown cleaning step {unknown[0]!r}; choose from {', '.join(CLEAN_STEPS)} or 'none'")
    return tuple(n for n in CLEAN_STEPS if n in names)


class Cleaner:
    """Applies the enabled steps to one document at a time and counts what each step removed.

    report[step] = {"documents": documents changed (char steps) or dropped (doc steps),
                    "chars": characters removed (negative when a step lengthens text, e.g. NFKC 'ﬁ' -> 'fi')}.
    """

    def __init__(self, steps: Iterable[str] = DEFAULT_CLEAN, unicode_form: str = "NFC", min_chars: int = 32):
        self.steps = tuple(steps)
        self.min_chars = min_chars
        self._char_steps = [(name, fn) for name, fn in (
            ("html", strip_html),
            ("unicode", lambda t: normalize_unicode(t, unicode_form)),
            ("control", remove_control_chars),
            ("whitespace", normalize_whitespace),
        ) if name in self.steps]
        self.report = {step: {"documents": 0, "chars": 0} for step in self.steps}

    def __call__(self, text: str) -> Optional[str]:
        """The cleaned document, or None when it is too short (or empty). Duplicates are dedup.py's to drop."""
        for name, fn in self._char_steps:
            cleaned = fn(text)
            if cleaned != text:
                self._count(name, len(text) - len(cleaned))
            text = cleaned
        if not text or ("short" in self.steps and len(text) < self.min_chars):
            self._count("short" if "short" in self.steps else "empty", len(text))
            return None
        return text

    def _count(self, step: str, chars: int) -> None:
        entry = self.report.setdefault(step, {"documents": 0, "chars": 0})
        entry["documents"] += 1
        entry["chars"] += chars
