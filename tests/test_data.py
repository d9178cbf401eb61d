"""Token windows over memory-mapped shards, and the resumable distributed sampler."""
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from support.data import flip_token, flip_token_keeping_size_and_mtime
from torch.utils.data import DataLoader, DistributedSampler

from hvd_llama import prepare
from hvd_llama.cli import UserError
from hvd_llama.prep.token_shards import META_FORMAT, META_VERSION, ShardWriter
from hvd_llama.tokenizer import Tokenizer
from hvd_llama.training.data import OPEN_SHARDS, SampleOrder, StepBatches, TokenWindows, read_meta


def write_data_dir(folder, train_tokens, val_tokens, shard_tokens, dtype=np.dtype("<u2")):
    """A data folder with known token values, laid out exactly as prepare writes it."""
    folder.mkdir(exist_ok=True)
    splits = {}
    for name, tokens in (("train", train_tokens), ("val", val_tokens)):
        writer = ShardWriter(folder, name, dtype, shard_tokens)
        writer.write(np.asarray(tokens))
        shards = writer.close()
        splits[name] = {"documents": 1, "chars": 0, "tokens": len(tokens), "shards": shards}
    meta = {"format": META_FORMAT, "format_version": META_VERSION, "vocab_size": 70_000, "dtype": dtype.name,
            "bos_id": 1, "eos_id": 2, "splits": splits}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def shard_dir(tmp_path):
    return write_data_dir(tmp_path / "data", np.arange(1000), np.arange(5000, 5100), shard_tokens=300)


def test_windows_are_consecutive_and_cross_shard_boundaries(shard_dir):
    windows = TokenWindows(shard_dir, "train", seq_len=64)
    assert len(windows) == (1000 - 1) // 64 == 15
    assert len(windows.meta["splits"]["train"]["shards"]) == 4
    for i in range(len(windows)):
        item = windows[i]
        assert item.dtype == torch.int64 and item.tolist() == list(range(64 * i, 64 * i + 65))
    with pytest.raises(IndexError):
        windows[len(windows)]
    val = TokenWindows(shard_dir, "val", seq_len=33)
    assert len(val) == 3 and val[2].tolist() == list(range(5066, 5100))


def test_exact_fit_uses_the_last_token(tmp_path):
    folder = write_data_dir(tmp_path / "d", np.arange(129), np.arange(10), shard_tokens=50)
    windows = TokenWindows(folder, "train", seq_len=64)
    assert len(windows) == 2 and windows[1][-1].item() == 128


def test_uint32_tokens(tmp_path):
    folder = write_data_dir(tmp_path / "d", np.arange(69_000, 69_100), np.arange(69_000, 69_010), shard_tokens=30,
                            dtype=np.dtype("<u4"))
    assert TokenWindows(folder, "train", seq_len=9)[10].tolist() == list(range(69_090, 69_100))


def test_pickles_for_dataloader_workers(shard_dir):
    windows = TokenWindows(shard_dir, "train", seq_len=16)
    first = windows[3]
    clone = pickle.loads(pickle.dumps(windows))
    assert len(pickle.dumps(windows)) < 10_000  # memory maps are not pickled, only paths
    assert torch.equal(clone[3], first)
    batch = next(iter(DataLoader(windows, batch_size=4)))
    assert batch.shape == (4, 17)


def test_prepared_corpus_round_trip(tmp_path):
    text = "".join(f"line {i}: caf\u00e9 \u65e5\u672c and some words to pack\n" for i in range(300))
    (tmp_path / "a.txt").write_text(text)
    prepare.prepare(["--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--vocab-size", "300",
                     "--shard-tokens", "1000", "--workers", "1"])
    tok = Tokenizer(tmp_path / "out/tokenizer.model")
    windows = TokenWindows(tmp_path / "out", "train", seq_len=100)
    stream = [windows[0][0].item()] + [t for i in range(len(windows)) for t in windows[i][1:].tolist()]
    meta = read_meta(tmp_path / "out")
    assert len(stream) == len(windows) * 100 + 1 > meta["splits"]["train"]["tokens"] - 100
    assert stream[0] == tok.bos_id
    assert text.startswith(tok.decode(stream[1:]))


@pytest.mark.parametrize("damage, pattern", [
    (lambda d: (d / "meta.json").unlink(), "has no meta.json"),
    (lambda d: (d / "meta.json").write_text("{not json"), "is not valid JSON"),
    (lambda d: (d / "meta.json").write_text('{"format": "other"}'), "was not written by hvd_llama.prepare"),
    (lambda d: (d / "train_0001.bin").unlink(), "train_0001.bin is missing"),
    (lambda d: (d / "train_0001.bin").write_bytes((d / "train_0001.bin").read_bytes()[:-2]), "truncated"),
    (lambda d: (d / "train_0001.bin").write_bytes(b"X" + (d / "train_0001.bin").read_bytes()[1:]), "bad magic"),
    (lambda d: flip_token(d / "train_0002.bin"), "does not match its checksum"),
])
def test_damaged_data_folder(shard_dir, damage, pattern):
    damage(shard_dir)
    with pytest.raises(UserError, match=pattern) as error:
        TokenWindows(shard_dir, "train", seq_len=8)
    assert "re-run `python -m hvd_llama.prepare`" in str(error.value)


def test_shards_are_checked_once_then_again_only_when_changed_or_asked(shard_dir):
    TokenWindows(shard_dir, "train", seq_len=8)  # no record yet: every shard is checked, then recorded
    recorded = json.loads((shard_dir / "verified.json").read_text())["files"]
    assert sorted(recorded) == [f"train_{k:04d}.bin" for k in range(4)]
    flip_token_keeping_size_and_mtime(shard_dir / "train_0002.bin")  # what a stat cannot see
    assert len(TokenWindows(shard_dir, "train", seq_len=8)) == 124  # not read again
    with pytest.raises(UserError, match="train_0002.bin does not match its checksum"):
        TokenWindows(shard_dir, "train", seq_len=8, verify=True)  # train --verify-data
    os.utime(shard_dir / "train_0002.bin")  # a new modification time: checked again
    with pytest.raises(UserError, match="train_0002.bin does not match its checksum"):
        TokenWindows(shard_dir, "train", seq_len=8)


def read_bytes() -> int:
    """Bytes this process has read through read(2) and friends so far (Linux)."""
    return int(re.search(r"^rchar: (\d+)", Path("/proc/self/io").read_text(), re.M).group(1))


def test_ten_thousand_shards_open_without_reading_them_and_map_a_few_at_a_time(tmp_path):
    folder = write_data_dir(tmp_path / "d", np.arange(10_000 * 1000) % 60_000, np.arange(100), shard_tokens=1000)
    shard_bytes = sum(p.stat().st_size for p in folder.glob("train_*.bin"))
    TokenWindows(folder, "train", seq_len=100)  # the first open checks them (prepare's own check, for a folder it made)
    before = read_bytes()
    windows = TokenWindows(folder, "train", seq_len=100)
    opened = read_bytes() - before
    assert len(windows.paths) == 10_000 and len(windows) == 99_999
    assert opened < shard_bytes / 10, (opened, shard_bytes)  # meta.json and verified.json, not the shards
    fds = len(os.listdir("/proc/self/fd"))
    assert [windows[i][0].item() for i in range(0, 99_999, 997)] == [(i * 100) % 60_000 for i in range(0, 99_999, 997)]
    assert len(windows._maps) == OPEN_SHARDS and len(os.listdir("/proc/self/fd")) <= fds + OPEN_SHARDS


def test_other_user_errors(shard_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist; create it with `python -m hvd_llama.prepare"):
        read_meta(tmp_path / "missing")
    with pytest.raises(UserError, match=r"val split .* has 100 tokens, fewer than one window of seq_len \+ 1 = 101"):
        TokenWindows(shard_dir, "val", seq_len=100)
    with pytest.raises(UserError, match="unknown split 'test'"):
        TokenWindows(shard_dir, "test", seq_len=8)


# ------------------------------------------------------------------------------------------- sample order

def torch_epoch(n, epoch, seed):
    """torch's own DistributedSampler order of one epoch on one rank: the reference SampleOrder follows."""
    sampler = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("n", [7, 100, 101])
def test_sample_order_is_torch_epochs_back_to_back(n):
    order = SampleOrder(n, seed=5)
    assert order.indices(0, 3 * n) == torch_epoch(n, 0, 5) + torch_epoch(n, 1, 5) + torch_epoch(n, 2, 5)
    assert order.indices(n - 2, 5) == torch_epoch(n, 0, 5)[-2:] + torch_epoch(n, 1, 5)[:3]  # across a boundary
    assert SampleOrder(n, seed=6).indices(0, n) != order.indices(0, n)


@pytest.mark.parametrize("size, batch, accum", [(1, 6, 1), (2, 3, 1), (3, 2, 1), (1, 3, 2), (2, 1, 3), (3, 1, 2)])
def test_a_step_reads_the_same_items_however_it_is_split(size, batch, accum):
    """Every split of a 6-item global batch over ranks and micro-steps reads the same items at every step,
    each once, so runs of different world sizes (and resumes across them) see the same data."""
    order = SampleOrder(17, seed=1)  # 17 items: steps straddle epoch boundaries
    dataset = torch.arange(17)
    for position in range(0, 60, 6):
        parts = [StepBatches(dataset, order, rank, size).step(position, batch, accum) for rank in range(size)]
        items = sorted(int(i) for rank in parts for micro in rank for i in micro)
        assert len(parts[0]) == accum and all(len(micro) == batch for rank in parts for micro in rank)
        assert items == sorted(order.indices(position, 6))


def test_sample_order_needs_items():
    with pytest.raises(UserError, match="holds no windows"):
        SampleOrder(0, seed=0)
