"""prepare at scale, on small data: Parquet and zstandard input, parts (row groups, byte ranges of JSON lines),
deduplication spilled to buckets by a small --memory-mb, the same output for any number of ranks, and a run that
is stopped or killed and run again."""
import json
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from support import REPO
from support.data import (
    assert_one_line_error,
    decode_documents,
    expected_document_split,
    make_document,
    run_cli,
    run_prepare,
)
from support.files import no_temp_folders
from support.multiproc import finish_job, job_env, run_job, run_one_process, run_snippet, start_job
from support.netns import IFACE, launcher_env, start_on_first_host

from hvd_llama.cli import UserError
from hvd_llama.prep import corpus, sources
from hvd_llama.prep.text import Cleaner


def zstd_frames(*chunks: bytes) -> bytes:
    """One zstandard frame per chunk, back to back (as `zstd` writes concatenated files)."""
    return b"".join(zstandard.ZstdCompressor().compress(chunk) for chunk in chunks)


def json_lines(texts, field="text") -> bytes:
    return "".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)).encode()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A folder of every format, with copies across files (which parts, and ranks, read apart). Returns (folder,
    the cleaned documents a prepare keeps, in the corpus's order)."""
    root = tmp_path_factory.mktemp("mixed")
    docs = [make_document(i) for i in range(40)]
    pq.write_table(pa.table({"id": list(range(12)), "text": docs[:12]}), root / "a.parquet", row_group_size=4)
    (root / "b.jsonl.zst").write_bytes(zstd_frames(json_lines(docs[12:18]), json_lines(docs[18:24] + docs[2:3])))
    (root / "c.txt.zst").write_bytes(zstd_frames(docs[24].encode()))
    (root / "d.jsonl").write_bytes(json_lines(docs[25:39] + docs[14:16]))
    (root / "e.txt").write_text(docs[39])
    raw = docs[:24] + docs[2:3] + docs[24:39] + docs[14:16] + docs[39:]
    expected = list(dict.fromkeys(Cleaner()(text) for text in raw))
    assert len(expected) == 40
    return root, expected


def documents(out) -> list:
    return decode_documents(out, "train") + decode_documents(out, "val")


def shard_bytes(out, meta) -> list:
    return [(out / s["file"]).read_bytes() for split in meta["splits"].values() for s in split["shards"]]


@pytest.fixture(scope="module")
def mixed_prepared(mixed, tmp_path_factory):
    """The mixed folder prepared in parts of about 2 kB (row groups, ranges of d.jsonl) and deduplication spilled
    into buckets of 1 kB."""
    out = tmp_path_factory.mktemp("prepared") / "out"
    meta = run_prepare("--input", mixed[0], "--out", out, "--vocab-size", 400, "--part-mb", 0.002,
                       "--memory-mb", 0.001, "--shard-tokens", 700)
    return out, meta


def test_parquet_and_zstd_read_in_parts_with_copies_across_parts_dropped(mixed, mixed_prepared):
    _, expected = mixed
    out, meta = mixed_prepared
    train, val = expected_document_split(expected)
    assert decode_documents(out, "train") == train and decode_documents(out, "val") == val
    assert meta["inputs"]["files"] == 5 and meta["inputs"]["documents"] == 43
    assert meta["cleaning"]["removed"]["dedup"]["documents"] == 3
    assert meta["work"]["parts"] > 5 and meta["work"]["buckets"] > 5  # row groups, byte ranges; spilled


def test_parts_and_buckets_change_the_shards_not_the_token_stream(mixed, mixed_prepared, tmp_path):
    out, meta = mixed_prepared
    whole = run_prepare("--input", mixed[0], "--out", tmp_path / "whole", "--vocab-size", 400, "--shard-tokens", 700)
    assert whole["work"]["parts"] == 1 and whole["work"]["buckets"] == 1
    assert whole["tokenizer_sha256"] == meta["tokenizer_sha256"] and whole["cleaning"] == meta["cleaning"]
    for name in ("train", "val"):
        assert whole["splits"][name]["tokens"] == meta["splits"][name]["tokens"]
        assert (np.concatenate([np.fromfile(tmp_path / "whole" / s["file"], np.uint16)[512:]
                                for s in whole["splits"][name]["shards"]]).tolist() ==
                np.concatenate([np.fromfile(out / s["file"], np.uint16)[512:]
                                for s in meta["splits"][name]["shards"]]).tolist())


def test_json_lines_cut_into_byte_ranges_read_each_line_once(tmp_path):
    texts = [f"record {i}: " + make_document(i)[:50 + 7 * i] for i in range(30)]
    (tmp_path / "a.jsonl").write_bytes(json_lines(texts) + b"\n\n")
    meta = run_prepare("--input", tmp_path / "a.jsonl", "--out", tmp_path / "out", "--vocab-size", 400,
                       "--part-mb", 0.0005)
    assert meta["work"]["parts"] > 5
    assert sorted(documents(tmp_path / "out")) == sorted(Cleaner()(t) for t in texts)
    assert meta["inputs"]["bytes"] == (tmp_path / "a.jsonl").stat().st_size


def test_where_a_record_is_is_worked_out_only_for_a_message(tmp_path, monkeypatch):
    """Its line number in a piece that starts inside the file means reading the file up to the piece: once per
    record, that made reading a 1 GB file quadratic (100 kB/s after its first part)."""
    texts = [make_document(i) for i in range(30)]
    (tmp_path / "a.jsonl").write_bytes(json_lines(texts) + json_lines(["a document without its field"], "body"))
    calls = []
    for module in (sources, corpus):  # wherever it is looked up from
        monkeypatch.setattr(module, "location", lambda piece, number: calls.append(number) or f"{piece.path}:?",
                            raising=False)
    with pytest.raises(UserError, match=r"a\.jsonl:\? has no text field 'text' \(it has: id, body\)"):
        run_prepare("--input", tmp_path / "a.jsonl", "--out", tmp_path / "out", "--part-mb", 0.002)
    assert calls == [1]  # the bad record's only (line 1 of the last piece)


def test_one_process_never_imports_horovod(mixed, tmp_path):
    result = run_one_process("hvd_llama.prepare", "--input", mixed[0], "--out", tmp_path / "out", "--vocab-size",
                             400, "--workers", 1)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "horovod imported: False"


@pytest.mark.parametrize("name, content, pattern", [
    ("a.parquet", lambda: pa.table({"id": [1], "body": ["x" * 40]}),
     r"a\.parquet has no column 'text' \(it has: id, body\); choose one with --text-field"),
    ("a.parquet", lambda: pa.table({"text": [1, 2]}), r"a\.parquet: column 'text' holds int64, expected strings"),
    ("a.parquet", lambda: b"PAR1 not really", r"a\.parquet is not a valid Parquet file"),
    ("a.jsonl.zst", lambda: zstd_frames(json_lines(["x" * 40] * 50))[:-9],
     r"a\.jsonl\.zst is not a valid zstandard file \(its last frame is truncated\)"),
    ("a.jsonl.zst", lambda: (lambda f: f[:12] + bytes(40) + f[52:])(zstd_frames(json_lines(["y" * 400] * 50))),
     r"a\.jsonl\.zst is not a valid zstandard file \(zstd decompressor error: Data corruption"),
    ("a.txt.zst", lambda: b"not zstandard", r"a\.txt\.zst is not a valid zstandard file"),
])
def test_bad_files_are_named_in_one_line_and_leave_nothing(tmp_path, name, content, pattern):
    (tmp_path / "in").mkdir()
    value = content()
    if isinstance(value, bytes):
        (tmp_path / "in" / name).write_bytes(value)
    else:
        pq.write_table(value, tmp_path / "in" / name)
    (tmp_path / "in/z.txt").write_text(make_document(1))  # a good file after it
    with pytest.raises(UserError, match=pattern):
        run_prepare("--input", tmp_path / "in", "--out", tmp_path / "out", "--vocab-size", 300)
    assert not (tmp_path / "out").exists() and no_temp_folders(tmp_path)


def test_bad_file_from_the_command_line(tmp_path):
    (tmp_path / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd broken")
    result = run_cli("--input", tmp_path / "a.jsonl.zst", "--out", tmp_path / "out")
    assert_one_line_error(result, r"a\.jsonl\.zst is not a valid zstandard file")
    assert not (tmp_path / "out").exists() and no_temp_folders(tmp_path)


# ------------------------------------------------------------------------------------------------------ ranks

MIXED_ARGS = ("--vocab-size", "400", "--part-mb", "0.002", "--memory-mb", "0.001", "--shard-tokens", "700")


def prepare_job(mixed, out, *extra, np=3, launcher="horovodrun", timeout=240):
    return run_job(["-m", "hvd_llama.prepare", "--input", str(mixed[0]), "--out", str(out), *MIXED_ARGS, "--workers",
                    "1", *map(str, extra)], np=np, launcher=launcher, timeout=timeout)


def assert_same_corpus(a_dir, a, b_dir, b, counts=True):
    for key in ("splits", "tokenizer_sha256", "split_method") + (("inputs", "cleaning") if counts else ()):
        assert a[key] == b[key], key
    assert shard_bytes(a_dir, a) == shard_bytes(b_dir, b)


@pytest.mark.distributed
def test_three_ranks_write_what_one_process_writes(mixed, mixed_prepared, tmp_path):
    job = prepare_job(mixed, tmp_path / "out")
    assert job.returncode == 0, job.output[-3000:]
    meta = json.loads((tmp_path / "out/meta.json").read_text())
    assert meta["work"]["ranks"] == 3 and meta["work"]["parts"] > 3
    assert_same_corpus(tmp_path / "out", meta, *mixed_prepared)
    assert len(re.findall(r"\]<stdout>:prepared 40 documents", job.output)) == 1  # rank 0 reports
    assert no_temp_folders(tmp_path)


@pytest.mark.distributed
def test_caps_keep_the_same_documents_on_two_ranks(mixed, tmp_path):
    one = run_prepare("--input", mixed[0], "--out", tmp_path / "one", *MIXED_ARGS, "--max-docs", 23)
    job = prepare_job(mixed, tmp_path / "two", "--max-docs", 23, np=2, launcher="mpirun")
    assert job.returncode == 0, job.output[-3000:]
    two = json.loads((tmp_path / "two/meta.json").read_text())
    assert sum(s["documents"] for s in two["splits"].values()) == 23
    # Each rank reads until its own count reaches the cap: what was read may differ, what is kept may not.
    assert_same_corpus(tmp_path / "two", two, tmp_path / "one", one, counts=False)


@pytest.mark.distributed
def test_a_tokenizer_sample_smaller_than_each_ranks_share_is_the_same_on_two_ranks(tmp_path):
    """Each rank's candidates reach the sample's budget (101 chunks of <= 1,000 characters, SentencePiece's
    least), so only those up to the ranks' smallest last priority travel: the sample, and the tokenizer, must not
    change."""
    (tmp_path / "in").mkdir()
    for i in range(240):
        (tmp_path / "in" / f"{i:03d}.txt").write_text(" ".join(make_document(i + k) for k in range(4)))
    args = ["--input", tmp_path / "in", "--vocab-size", 400, "--tokenizer-sentences", 101, "--part-mb", 0.02]
    one = run_prepare(*args, "--out", tmp_path / "one")
    job = run_job(["-m", "hvd_llama.prepare", *map(str, args), "--out", str(tmp_path / "two"), "--workers", "1"],
                  np=2, timeout=240)
    assert job.returncode == 0, job.output[-3000:]
    assert "training a 400-piece tokenizer on 101 text chunks" in job.output
    assert_same_corpus(tmp_path / "two", json.loads((tmp_path / "two/meta.json").read_text()), tmp_path / "one", one)


DYING_RANK = """
import os, sys
from hvd_llama import prepare
from hvd_llama.prep import corpus

read_part = corpus.read_part

def read_or_die(pieces, folder, *args):
    if os.environ.get("HOROVOD_RANK") == "1" and folder.name == "00003":
        os._exit(3)  # a node lost in the middle of reading
    return read_part(pieces, folder, *args)

corpus.read_part = read_or_die
prepare.main(sys.argv[1:])
"""


@pytest.mark.distributed
def test_a_rank_that_dies_leaves_no_corpus_and_one_process_finishes_the_run(mixed, mixed_prepared, tmp_path):
    out = tmp_path / "out"
    args = ["--input", str(mixed[0]), "--out", str(out), *MIXED_ARGS]
    job = run_snippet(DYING_RANK, tmp_path, args + ["--workers", "1"], np=2, timeout=120)
    assert job.returncode != 0
    assert not out.exists() and (tmp_path / ".out.prepare/parts/00000/read.json").is_file()
    meta = run_prepare(*args)  # resumed with another number of ranks
    assert meta["work"]["ranks"] == 1
    assert_same_corpus(out, meta, *mixed_prepared)
    assert no_temp_folders(tmp_path)


# ----------------------------------------------------------------------------------- stopping and resuming

def start_prepare(args):
    return subprocess.Popen([sys.executable, "-m", "hvd_llama.prepare", *map(str, args)], cwd=REPO, env=job_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def stdlib_run(tmp_path_factory):
    """Arguments of a run of a few seconds over 3 MB of the standard library in 12 parts, and its result."""
    root = tmp_path_factory.mktemp("stdlib_run")
    args = ["--input", "stdlib", "--max-chars", 3_000_000, "--part-mb", 0.25, "--vocab-size", 400, "--workers", 2]
    result = subprocess.run([sys.executable, "-m", "hvd_llama.prepare", *map(str, args), "--out", str(root / "out")],
                            cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return args, root / "out", json.loads((root / "out/meta.json").read_text())


def test_sigterm_stops_in_seconds_and_the_same_command_continues(stdlib_run, tmp_path):
    args, reference, meta = stdlib_run
    out = tmp_path / "out"
    process = start_prepare([*args, "--out", out])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.prepare/parts/*/read.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    stopped_in = time.monotonic() - signalled
    assert process.returncode == 130, stderr
    assert "run the same command again to continue" in stderr and not out.exists()
    read = len(list(tmp_path.glob(".out.prepare/parts/*/read.json")))
    again = subprocess.run([sys.executable, "-m", "hvd_llama.prepare", *map(str, args), "--out", str(out)], cwd=REPO,
                           env=job_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert re.search(rf"resuming the unfinished run in .*: {read} of \d+ parts already read", again.stderr)
    assert_same_corpus(out, json.loads((out / "meta.json").read_text()), reference, meta)
    assert stopped_in < json.loads((out / "meta.json").read_text())["seconds"]  # sooner than a whole run


@pytest.mark.distributed
def test_sigterm_to_horovodrun_stops_every_rank_and_one_process_continues(stdlib_run, tmp_path):
    args, reference, meta = stdlib_run
    out = tmp_path / "out"
    job = start_job(["-m", "hvd_llama.prepare", *map(str, args), "--out", str(out)], np=2)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob(".out.prepare/parts/*/read.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGTERM)
    stopped = finish_job(job, timeout=60)
    assert stopped.returncode != 0 and not out.exists()
    assert len(re.findall(r"<stderr>:prepare stopped; what it finished is kept", stopped.output)) == 2, stopped.output
    again = run_prepare(*args, "--out", out)
    assert_same_corpus(out, again, reference, meta)
    assert no_temp_folders(tmp_path)


@pytest.mark.parametrize("seed", [random.randrange(1 << 30)])
def test_a_kill_at_a_random_point_and_a_rerun_equal_the_uninterrupted_run(stdlib_run, tmp_path, seed):
    args, reference, meta = stdlib_run
    out = tmp_path / "out"
    process = start_prepare([*args, "--out", out])
    time.sleep(random.Random(seed).uniform(0.2, 1.2 * meta["seconds"]))
    process.kill()  # SIGKILL: no handler runs
    process.communicate(timeout=60)
    again = subprocess.run([sys.executable, "-m", "hvd_llama.prepare", *map(str, args), "--out", str(out)], cwd=REPO,
                           env=job_env(), capture_output=True, text=True, timeout=300)
    if again.returncode == 2 and "already holds a prepared corpus" in again.stderr:
        assert process.returncode == 0  # it had finished before the kill
    else:
        assert again.returncode == 0, again.stderr
    assert_same_corpus(out, json.loads((out / "meta.json").read_text()), reference, meta)
    assert no_temp_folders(tmp_path)


@pytest.mark.distributed
@pytest.mark.slow
def test_three_ranks_on_two_hosts_write_what_one_process_writes(hosts, mixed, mixed_prepared, tmp_path):  # noqa: F811
    """horovodrun -np 3 over ssh across two network-namespace hosts, two ranks on one and one on the other: the
    parts and buckets they share go through the filesystem both see, counts and candidates through Gloo. (Not
    mpirun: Open MPI crashes with two ranks on one of these hosts, which share one host name.)"""
    a, b = (host.address for host in hosts.hosts)
    command = ["horovodrun", "--gloo", "-np", "3", "-H", f"{a}:2,{b}:1", "--network-interfaces", IFACE, "python",
               "-m", "hvd_llama.prepare", "--input", str(mixed[0]), "--out", str(tmp_path / "out"), *MIXED_ARGS,
               "--workers", "1"]
    before = [host.counter("tx_bytes") for host in hosts.hosts]
    job = finish_job(start_on_first_host(hosts, command, launcher_env(hosts, "horovodrun", tmp_path / "home")),
                     timeout=240)
    assert job.returncode == 0, job.output[-3000:]
    meta = json.loads((tmp_path / "out/meta.json").read_text())
    assert meta["work"]["ranks"] == 3
    assert_same_corpus(tmp_path / "out", meta, *mixed_prepared)
    assert all(host.counter("tx_bytes") > sent + 10_000 for host, sent in zip(hosts.hosts, before))
