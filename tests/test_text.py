"""Cleaning steps, one by one, and the Cleaner's report."""
import pytest

from hvd_llama.prep.text import (
    DEFAULT_CLEAN,
    Cleaner,
    decode_utf8,
    document_hash,
    normalize_unicode,
    normalize_whitespace,
    parse_steps,
    remove_control_chars,
    sentence_chunks,
    strip_html,
)

CODE = "def f(x):\n    if x:\n\treturn {'a':  1}\n\n\n    return x  # two  spaces\n"


def test_strip_html_removes_tags_scripts_comments_and_decodes_entities():
    page = ('<html><head><style>p {color: red}</style><script>var a = "<b>";</script></head>'
            '<body><!-- note --><p class="x">Fish &amp; chips&nbsp;&lt;3</p><p>next<br/>line</p></body></html>')
    assert strip_html(page) == "Fish & chips\u00a0<3\nnext\nline\n"


def test_strip_html_leaves_text_without_tags_alone():
    assert strip_html("a < b and c > d") == "a < b and c > d"


def test_normalize_unicode_nfc_composes_and_nfkc_folds_compatibility_forms():
    decomposed = "Cafe\u0301 \ufb01le \uff21"
    assert normalize_unicode(decomposed, "NFC") == "Caf\u00e9 \ufb01le \uff21"
    assert normalize_unicode(decomposed, "NFKC") == "Caf\u00e9 file A"
    assert normalize_unicode("plain ascii", "NFC") == "plain ascii"


def test_remove_control_chars_keeps_tab_and_line_ends():
    assert remove_control_chars("\ufeffa\x00b\x07c\td\ne\r\nf\x7fg\x85h\x0ci") == "abc\td\ne\r\nfghi"


def test_normalize_whitespace_unifies_line_ends_and_trims():
    text = "\n  \n\r\nfirst  line  \r\nsecond\u00a0word\t\rthird\u2028fourth\n\n\n\n\n\nlast \n\n"
    assert normalize_whitespace(text) == "first  line\nsecond word\nthird\nfourth\n\n\nlast"


def test_normalize_whitespace_preserves_code_indentation():
    assert normalize_whitespace(CODE) == CODE.rstrip()
    assert normalize_whitespace("    indented first line\n") == "    indented first line"


def test_document_hash_is_content_based():
    assert document_hash("abc") == document_hash("abc") != document_hash("abd")
    assert len(document_hash("abc")) == 16


def test_decode_utf8_counts_replacements_and_drops_bom():
    assert decode_utf8("\ufeffh\u00e9".encode("utf-8")) == ("h\u00e9", 0)
    text, bad = decode_utf8(b"ok \xff\xfe and \xc3 end \xef\xbf\xbd")  # the last is a real U+FFFD
    assert text == "ok \ufffd\ufffd and \ufffd end \ufffd"
    assert bad == 3


def test_sentence_chunks_are_bounded_whole_lines_and_lossless():
    text = "short\n" * 50 + "x" * 250 + "\nend"
    chunks = list(sentence_chunks(text, 100))
    assert "".join(chunks) == text
    assert all(len(c) <= 100 for c in chunks)
    assert chunks[0] == "short\n" * 16  # 16 * 6 = 96 chars; one more line would exceed 100


def test_parse_steps():
    assert parse_steps("whitespace,unicode") == ("unicode", "whitespace")
    assert parse_steps("none") == ()
    with pytest.raises(ValueError, match="unknown cleaning step 'nfc'"):
        parse_steps("unicode,nfc")


def test_cleaner_drops_short_documents_and_reports():
    cleaner = Cleaner(DEFAULT_CLEAN, min_chars=10)
    assert cleaner("tiny") is None
    assert cleaner("  a long enough document\x00  ") == "  a long enough document"
    assert cleaner("  a long enough document\r\n") == "  a long enough document"  # duplicates: dedup.py's
    assert cleaner("\n\n") is None
    assert cleaner.report["short"] == {"documents": 2, "chars": 4}
    assert cleaner.report["dedup"] == {"documents": 0, "chars": 0}  # filled in by the corpus-wide deduplication
    assert cleaner.report["control"] == {"documents": 1, "chars": 1}
    assert cleaner.report["whitespace"] == {"documents": 3, "chars": 2 + 2 + 2}
    assert "html" not in cleaner.report


def test_cleaner_applies_only_enabled_steps():
    raw = "<b>x</b>  \r\n  y\x00 caf\u0065\u0301"
    assert Cleaner((), min_chars=0)(raw) == raw
    assert Cleaner(("html",), min_chars=0)(raw) == "x  \r\n  y\x00 caf\u0065\u0301"
    assert Cleaner(("unicode", "control"), min_chars=0)(raw) == "<b>x</b>  \r\n  y caf\u00e9"
    # without 'short', empty documents are still dropped (they would be bos+eos only) and counted
    cleaner = Cleaner(("whitespace",), min_chars=100)
    assert cleaner("short but kept") == "short but kept"
    assert cleaner("   ") is None and cleaner.report["empty"]["documents"] == 1


def test_cleaner_keeps_code_identical():
    assert Cleaner()(CODE) == CODE.rstrip()
