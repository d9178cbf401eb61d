"""The prepare pipeline end to end: shards decode back to the cleaned corpus, splits are deterministic,
and bad input fails with a one-line error, leaving --out complete or untouched."""
import gzip
import json
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
from support.data import (
    WORDS,
    assert_one_line_error,
    decode_documents,
    expected_document_split,
    make_document,
    run_cli,
    run_prepare,
)
from support.files import no_temp_folders

from hvd_llama import prepare
from hvd_llama.cli import UserError
from hvd_llama.files import sha256_file
from hvd_llama.prep import encode
from hvd_llama.prep.sources import stdlib_files
from hvd_llama.prep.text import Cleaner
from hvd_llama.prep.token_shards import HEADER_BYTES, ShardWriter, read_shard_header, token_dtype


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of 25 kept documents in every supported format, plus files that must be skipped or dropped.
    Returns (folder, expected cleaned documents in reading order)."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "sub").mkdir()
    (root / ".hidden").mkdir()
    raw = {}  # relative path -> list of raw documents, for the files that are read
    for i in range(20):
        raw[f"doc_{i:02d}.txt"] = [make_document(i)]
        (root / f"doc_{i:02d}.txt").write_text(make_document(i), encoding="utf-8", newline="")
    raw["dup.txt"] = [make_document(3) + "\n\n"]  # a duplicate of doc_03 once cleaned
    (root / "dup.txt").write_text(raw["dup.txt"][0], encoding="utf-8")
    raw["tiny.txt"] = ["hi"]  # dropped as too short
    (root / "tiny.txt").write_text("hi")
    raw["notes.md.gz"] = ["# Notes\n\nSome *markdown* notes about " + make_document(21)]
    (root / "notes.md.gz").write_bytes(gzip.compress(raw["notes.md.gz"][0].encode()))
    records = [{"id": n, "text": make_document(30 + n)} for n in range(3)]
    raw["sub/data.jsonl.gz"] = [r["text"] for r in records]
    (root / "sub/data.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n\n" for r in records).encode()))
    raw["sub/code.py"] = ["import os\n\n\nclass A:\n    def f(self):\n\t\treturn os.sep  # tab\n" * 3]
    (root / "sub/code.py").write_text(raw["sub/code.py"][0])
    (root / "skip_me.txt").write_text(make_document(40))  # excluded with --exclude
    (root / "image.bin").write_bytes(bytes(range(256)))  # not matched by the default --include
    (root / ".hidden/secret.txt").write_text(make_document(41))  # hidden folders are skipped
    cleaner = Cleaner()
    cleaned = [c for rel in sorted(raw) for text in raw[rel] if (c := cleaner(text)) is not None]
    expected = list(dict.fromkeys(cleaned))  # the first of equal documents is kept
    assert len(expected) == 25 == len(cleaned) - 1
    return root, expected


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    root, _ = corpus
    out = tmp_path_factory.mktemp("prepared") / "data"
    meta = run_prepare("--input", root, "--out", out, "--exclude", "skip_*", "--vocab-size", 600,
                       "--shard-tokens", 500)
    return out, meta


def test_shards_decode_to_the_cleaned_corpus_split_by_split(corpus, prepared):
    _, expected = corpus
    out, meta = prepared
    train, val = expected_document_split(expected)
    assert meta["split_method"] == "documents"
    assert decode_documents(out, "train") == train
    assert decode_documents(out, "val") == val
    assert meta["splits"]["train"]["documents"] == len(train) and meta["splits"]["val"]["documents"] == len(val)
    assert meta["splits"]["train"]["chars"] == sum(map(len, train))
    assert meta["splits"]["val"]["chars"] == sum(map(len, val))


def test_meta_and_shard_files(prepared):
    out, meta = prepared
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["vocab_size"] == 600 and meta["dtype"] == "uint16" and (meta["bos_id"], meta["eos_id"]) == (1, 2)
    assert meta["tokenizer_sha256"] == sha256_file(out / "tokenizer.model")
    train_shards = meta["splits"]["train"]["shards"]
    assert len(train_shards) > 1 and all(s["tokens"] == 500 for s in train_shards[:-1])
    files = sorted(p.name for p in out.iterdir())
    shards = [s["file"] for split in meta["splits"].values() for s in split["shards"]]
    assert files == sorted(["meta.json", "tokenizer.model", "verified.json"] + shards)
    assert shards[0] == "train_00000_0000.bin" and shards[-1] == "val_00000_0000.bin"  # one part: one stream
    for split in meta["splits"].values():
        for shard in split["shards"]:
            assert sha256_file(out / shard["file"]) == shard["sha256"]
    assert meta["inputs"]["files"] == 25 and meta["inputs"]["documents"] == 27
    assert meta["cleaning"]["removed"]["short"]["documents"] == 1
    assert meta["cleaning"]["removed"]["dedup"]["documents"] == 1
    assert meta["cleaning"]["removed"]["control"]["documents"] > 0
    assert meta["command"].startswith("python -m hvd_llama.prepare --input ")
    assert meta["settings"]["tokenizer"]["vocab_size"] == 600 and meta["work"]["ranks"] == 1
    assert not list(out.parent.glob(".data.*"))  # no temporary folder left behind


def test_parallel_run_and_existing_tokenizer_give_identical_shards(corpus, prepared, tmp_path, monkeypatch):
    root, _ = corpus
    out, meta = prepared
    monkeypatch.setattr(encode, "ENCODE_BATCH_BYTES", 2000)  # several batches, so the worker pool encodes them
    again = run_prepare("--input", root, "--out", tmp_path / "again", "--exclude", "skip_*", "--vocab-size", 600,
                        "--shard-tokens", 500, workers=2)
    reuse = run_prepare("--input", root, "--out", tmp_path / "reuse", "--exclude", "skip_*",
                        "--tokenizer", out / "tokenizer.model", "--shard-tokens", 500)
    for other in (again, reuse):
        assert other["splits"] == meta["splits"]
        assert other["tokenizer_sha256"] == meta["tokenizer_sha256"]
    assert reuse["tokenizer_trained"] is False


def test_few_documents_are_split_by_characters(tmp_path):
    texts = [f"First document, caf\u00e9 \u65e5\u672c {'x' * 200}\n", "Second one, \u00fcber " * 30,
             "Third: " + " ".join(WORDS) * 8]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
    args = ("--input", tmp_path / "0.txt", tmp_path / "1.txt", tmp_path / "2.txt", "--vocab-size", 300)
    meta = run_prepare(*args, "--out", tmp_path / "a")
    cleaned = [Cleaner()(t) for t in texts]
    whole = "".join(cleaned)
    cut = int(len(whole) * 0.9)
    assert cut > len(cleaned[0]) + len(cleaned[1])  # the cut falls inside the third document
    assert meta["split_method"] == "characters"
    assert decode_documents(tmp_path / "a", "train") == cleaned[:2] + [whole[len(cleaned[0]) + len(cleaned[1]):cut]]
    assert decode_documents(tmp_path / "a", "val") == [whole[cut:]]
    assert (meta["splits"]["train"]["chars"], meta["splits"]["val"]["chars"]) == (cut, len(whole) - cut)
    again = run_prepare(*args, "--out", tmp_path / "b")
    assert again["splits"] == meta["splits"] and again["tokenizer_sha256"] == meta["tokenizer_sha256"]


def test_one_long_document_last_tenth_is_validation(tmp_path, corpus_path):
    meta = run_prepare("--input", corpus_path, "--out", tmp_path / "out", "--vocab-size", 512, workers=2)
    text = Cleaner()(corpus_path.read_text(encoding="utf-8"))
    cut = int(len(text) * 0.9)
    assert meta["split_method"] == "characters"
    assert decode_documents(tmp_path / "out", "train") == [text[:cut]]
    assert decode_documents(tmp_path / "out", "val") == [text[cut:]]


def test_worker_pool_prints_no_warning(tmp_path):
    """The fork server preloads hvd_llama.prep.encode, not the command run as __main__: no runpy RuntimeWarning."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "hvd_llama.prepare", "--input", "stdlib", "--out", str(out),
                             "--max-chars", "3000000", "--vocab-size", "400", "--workers", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "meta.json").read_text())["inputs"]["bytes"] > 2 * encode.ENCODE_BATCH_BYTES  # pooled
    assert "Warning" not in result.stderr, result.stderr


def test_stdlib_end_to_end_with_caps(tmp_path):
    out = tmp_path / "stdlib"
    result = subprocess.run([sys.executable, "-m", "hvd_llama.prepare", "--input", "stdlib", "--out", str(out),
                             "--max-docs", "40", "--vocab-size", "1000"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40
    assert meta["split_method"] == "documents" and meta["splits"]["val"]["tokens"] > 0
    assert re.search(r"^prepared 40 documents, [\d,]+ characters -> [\d,]+ tokens \(\d+\.\d\d characters/token\) "
                     r"in \d+\.\d s \(\d+\.\d\d MB/s, 1 rank\(s\) x \d+ worker\(s\)\), peak RSS \d+ MB per rank"
                     r"( \+ \d+ MB per worker)? -> ", result.stdout, re.MULTILINE)
    assert "encode" in result.stderr and "B/s" in result.stderr  # progress bar with throughput
    docs = decode_documents(out, "train") + decode_documents(out, "val")
    assert sum(map(len, docs)) == meta["splits"]["train"]["chars"] + meta["splits"]["val"]["chars"]
    assert all(len(d) >= 32 for d in docs) and any(d.startswith('"""') for d in docs)


@pytest.mark.slow
def test_stdlib_defaults_are_fast(tmp_path):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "hvd_llama.prepare", "--input", "stdlib", "--out",
                             str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert time.perf_counter() - start < 60
    assert json.loads((tmp_path / "x/meta.json").read_text())["splits"]["train"]["tokens"] > 1_000_000


def test_stdlib_files_skip_tests_and_installed_packages():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    assert root / "os.py" in files and root / "json/decoder.py" in files
    assert not [p for p in files if {"site-packages", "test", "tests"} & set(p.relative_to(root).parts)]
    assert files == sorted(files, key=lambda p: p.relative_to(root).as_posix())


def test_caps_stop_reading_early(corpus, tmp_path):
    by_docs = run_prepare("--input", corpus[0], "--out", tmp_path / "a", "--vocab-size", 400, "--max-docs", 21)
    assert sum(s["documents"] for s in by_docs["splits"].values()) == 21 and by_docs["split_method"] == "documents"
    by_chars = run_prepare("--input", corpus[0], "--out", tmp_path / "b", "--vocab-size", 400, "--max-chars", 600)
    assert by_chars["inputs"]["files"] < 5 and by_chars["split_method"] == "characters"
    assert sum(s["chars"] for s in by_chars["splits"].values()) >= 600


def test_jsonl_field_option(tmp_path):
    records = [{"body": f"record {i}: " + " ".join(WORDS[i:] + WORDS[:i])} for i in range(25)]
    (tmp_path / "a.ndjson").write_text("".join(json.dumps(r) + "\n" for r in records))
    run_prepare("--input", tmp_path / "a.ndjson", "--out", tmp_path / "out", "--vocab-size", 300,
                "--jsonl-field", "body")
    docs = decode_documents(tmp_path / "out", "train") + decode_documents(tmp_path / "out", "val")
    assert sorted(docs) == sorted(r["body"] for r in records)


def test_token_dtype_and_uint32_shards(tmp_path):
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    writer = ShardWriter(tmp_path, "train", token_dtype(100_000), shard_tokens=7)
    writer.write(np.arange(99_990, 100_000))
    writer.write(np.arange(5))
    shards = writer.close()
    assert [s["tokens"] for s in shards] == [7, 7, 1]
    tokens = [np.fromfile(tmp_path / s["file"], dtype="<u4", offset=HEADER_BYTES) for s in shards]
    assert np.concatenate(tokens).tolist() == list(range(99_990, 100_000)) + list(range(5))
    assert read_shard_header(tmp_path / "train_0002.bin") == (np.dtype("<u4"), 1)


# ------------------------------------------------------------------------------------------------ bad input

def test_cli_help():
    result = run_cli("--help")
    assert result.returncode == 0 and "--vocab-size" in result.stdout and "stdlib" in result.stdout


def test_cli_missing_input(tmp_path):
    result = run_cli("--input", tmp_path / "nope.txt", "--out", tmp_path / "out")
    assert_one_line_error(result, r"--input .*nope\.txt does not exist")
    assert not (tmp_path / "out").exists() and no_temp_folders(tmp_path)


def test_cli_tokenizer_that_is_not_sentencepiece(tmp_path, corpus):
    (tmp_path / "tokenizer.model").write_text("definitely not a model")
    result = run_cli("--input", corpus[0], "--out", tmp_path / "out", "--tokenizer", tmp_path / "tokenizer.model")
    assert_one_line_error(result, "is not a SentencePiece model")
    assert not (tmp_path / "out").exists() and no_temp_folders(tmp_path)


def test_cli_vocabulary_larger_than_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("a small corpus with few distinct pieces " * 20)
    result = run_cli("--input", tmp_path / "a.txt", "--out", tmp_path / "out", "--vocab-size", 8000)
    assert_one_line_error(result, r"--vocab-size 8000 is larger than this corpus supports.*--vocab-size \d+")
    assert not (tmp_path / "out").exists() and no_temp_folders(tmp_path)


def test_cli_refuses_to_replace_another_corpus(tmp_path, prepared):
    out = tmp_path / "out"
    (tmp_path / "a.txt").write_text("another corpus, long enough to keep " * 40)
    assert run_cli("--input", tmp_path / "a.txt", "--out", out, "--vocab-size", 300).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run_cli("--input", prepared[0] / "meta.json", "--out", out, "--vocab-size", 300)
    assert_one_line_error(result, "already holds a prepared corpus; pass --overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and no_temp_folders(tmp_path)


def test_overwrite_replaces_a_corpus_but_never_other_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first corpus text, long enough to keep " * 40)
    (tmp_path / "b.txt").write_text("second corpus text is different, long enough " * 40)
    run_prepare("--input", tmp_path / "a.txt", "--out", tmp_path / "out", "--vocab-size", 300)
    meta = run_prepare("--input", tmp_path / "b.txt", "--out", tmp_path / "out", "--vocab-size", 300, "--overwrite")
    assert decode_documents(tmp_path / "out", "val")[0].endswith("long enough")
    assert json.loads((tmp_path / "out/meta.json").read_text()) == meta and no_temp_folders(tmp_path)
    (tmp_path / "home").mkdir()
    (tmp_path / "home/precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="non-empty folder that does not hold a prepared corpus"):
        run_prepare("--input", tmp_path / "a.txt", "--out", tmp_path / "home", "--overwrite")
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["precious.txt"]


@pytest.mark.parametrize("files, pattern", [
    ({"empty.txt": b""}, r"empty after cleaning: 1 documents read from 1 files, all dropped \(short: 1\)"),
    ({"a.txt": b"short", "b.txt": b"  \n\x00\n"}, r"empty after cleaning: 2 documents .* \(short: 2\)"),
    ({"a.jsonl": b'{"content": "x"}\n'}, r"a\.jsonl:1 has no text field 'text' \(it has: content\); choose one with"),
    ({"a.jsonl": b'{"text": "fine"}\nnot json\n'}, r"a\.jsonl:2 is not valid JSON"),
    ({"a.txt.gz": b"not gzip at all"}, r"a\.txt\.gz is not a valid gzip file"),
    ({"a.txt": b"tiny corpus but long enough to keep as one document"}, r"too small to hold out --val-fraction"),
])
def test_bad_corpus(tmp_path, files, pattern):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=pattern):
        run_prepare("--input", *[tmp_path / n for n in files], "--out", tmp_path / "out", "--val-fraction", 0.99)
    assert not (tmp_path / "out").exists() and no_temp_folders(tmp_path)


@pytest.mark.parametrize("args, pattern", [
    (("--clean", "unicode,bogus"), "--clean: unknown cleaning step 'bogus'"),
    (("--val-fraction", "1.5"), r"--val-fraction 1\.5 must be in \[0, 1\)"),
    (("--shard-tokens", "0"), "--shard-tokens 0 must be at least 1"),
    (("--min-chars", "-1"), "--min-chars -1 must be >= 0"),
    (("--tokenizer-sentences", "100"), r"--tokenizer-sentences 100 must be more than 100 \(SentencePiece's least\)"),
    (("--memory-mb", "0"), "--memory-mb 0.0 must be positive"),
])
def test_bad_options(tmp_path, args, pattern):
    with pytest.raises(UserError, match=pattern):
        run_prepare("--input", tmp_path / "nope", "--out", tmp_path / "out", *args)


def test_folder_without_matching_files(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.bin").write_bytes(b"\x00")
    with pytest.raises(UserError, match=r"holds no files matching --include"):
        run_prepare("--input", tmp_path / "in", "--out", tmp_path / "out")


def test_undecodable_bytes_are_replaced_and_counted(tmp_path, capsys):
    good = "valid text that is long enough to be kept around. " * 10
    (tmp_path / "a.txt").write_bytes(good.encode() + b"\xff\xfe broken \xc3(" + good.encode())
    meta = run_prepare("--input", tmp_path / "a.txt", "--out", tmp_path / "out", "--vocab-size", 300)
    assert meta["inputs"]["undecodable_bytes"] == 3 and meta["inputs"]["files_with_undecodable_bytes"] == 1
    docs = decode_documents(tmp_path / "out", "train") + decode_documents(tmp_path / "out", "val")
    assert "".join(docs) == Cleaner()(good + "\ufffd\ufffd broken \ufffd(" + good)
    assert "3 undecodable bytes" in capsys.readouterr().out


def test_ctrl_c_during_encoding_leaves_no_corpus_and_the_same_command_finishes_it(tmp_path, corpus, prepared,
                                                                                 monkeypatch, capsys):
    calls = []

    def interrupted_write(self, tokens):
        calls.append(len(tokens))
        raise KeyboardInterrupt

    write = ShardWriter.write
    monkeypatch.setattr(ShardWriter, "write", interrupted_write)
    monkeypatch.setattr(encode, "ENCODE_BATCH_BYTES", 2000)  # several batches, so the pool is used
    args = ["--input", str(corpus[0]), "--out", str(tmp_path / "out"), "--exclude", "skip_*", "--vocab-size", "600",
            "--shard-tokens", "500", "--workers", "2"]
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(args)
    assert exit_info.value.code == 130 and calls
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.prepare/parts/00000/read.json").is_file()
    assert "run the same command again to continue" in capsys.readouterr().err
    monkeypatch.setattr(ShardWriter, "write", write)
    assert prepare.prepare(args)["splits"] == prepared[1]["splits"]
    assert "resuming the unfinished run" in capsys.readouterr().err and no_temp_folders(tmp_path)


def test_sigint_while_reading_keeps_the_staging_folder_and_no_corpus(tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "hvd_llama.prepare", "--input", "stdlib", "--out", str(out),
                                "--part-mb", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob(".out.prepare/parts/*/read.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted")
    assert not out.exists() and not list(tmp_path.glob(".out.prepare/*.bin"))  # stopped while reading
