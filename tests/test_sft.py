"""Supervised fine-tuning data: prepare --sft end to end, SFTExamples rows and masks, and the response-only loss."""
import gzip
import hashlib
import json
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from support.data import run_prepare
from support.files import no_temp_folders
from torch.utils.data import DataLoader

from hvd_llama import prepare
from hvd_llama.cli import UserError
from hvd_llama.files import sha256_file
from hvd_llama.model import ModelConfig, Transformer
from hvd_llama.prep import encode
from hvd_llama.tokenizer import Tokenizer
from hvd_llama.training.compute import count_targets, token_losses
from hvd_llama.training.data import (
    SampleOrder,
    SFTExamples,
    StepBatches,
    TokenWindows,
    inputs_and_targets,
    open_split,
    read_meta,
)

# Truncation is expected in most tests here; the test about it checks the warning itself.
pytestmark = pytest.mark.filterwarnings("ignore:.* examples dropped .* truncated:UserWarning")

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda sigma omega caf\u00e9 na\u00efve "
         "\u00fcber \u65e5\u672c").split()


def make_records():
    """(raw record, cleaned prompt, cleaned response) in file order; one duplicate comes last."""
    rows = []
    for i in range(28):
        prompt = f"Q{i}: what follows {' '.join(WORDS[i % 7:i % 7 + 1 + i % 4])}?\n"
        response = " ".join(WORDS[(i * 5 + k) % len(WORDS)] for k in range(3 + i % 9)) + f" ({i})"
        rows.append(({"prompt": prompt, "response": response, "id": i}, prompt, response))
    rows.append(({"prompt": "cafe\u0301 au lait?", "response": "ok\x07 done\u200b"},
                 "caf\u00e9 au lait?", "ok done\u200b"))  # NFC merges e + U+0301; BEL goes, ZWSP is not a control
    rows.append(({"prompt": "", "response": "an answer without a prompt"}, "", "an answer without a prompt"))
    rows.append(({"prompt": "Write a long answer.\n", "response": "  indented\r\n" + " ".join(WORDS * 6)},
                 "Write a long answer.\n", "  indented\r\n" + " ".join(WORDS * 6)))
    rows.append((rows[0][0], None, None))  # exact duplicate: dropped
    return rows


def write_inputs(folder):
    """a.jsonl (plain, with a blank line) and b.jsonl.gz in a folder, plus a .txt that --sft must not read."""
    rows = make_records()
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r, _, _ in rows]
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(lines[:20]) + "\n", encoding="utf-8")
    (folder / "b.jsonl.gz").write_bytes(gzip.compress("".join(lines[20:]).encode("utf-8")))
    (folder / "notes.txt").write_text("not json at all")
    return [(p, r) for _, p, r in rows if p is not None]


def example_hash(prompt, response):
    return hashlib.blake2b(f"{prompt}\0{response}".encode(), digest_size=16).digest()


def expected_split(examples, fraction=0.1):
    n_val = max(1, round(len(examples) * fraction))
    val_ids = set(sorted(range(len(examples)), key=lambda i: (example_hash(*examples[i]), i))[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_ids]
    return train, [e for i, e in enumerate(examples) if i in val_ids]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """(folder, meta, expected (prompt, response) pairs per split) of a prepare --sft run that trains its tokenizer."""
    root = tmp_path_factory.mktemp("sft")
    examples = write_inputs(root / "in")
    meta = run_prepare("--sft", "--input", root / "in", "--out", root / "out", "--vocab-size", 320)
    train, val = expected_split(examples)
    return root / "out", meta, {"train": train, "val": val}


def encode_example(tok, prompt, response):
    return [tok.bos_id] + tok.encode(prompt) + tok.encode(response) + [tok.eos_id]


# ------------------------------------------------------------------------------------------------ prepare --sft

def test_prepare_sft_writes_examples_index_and_meta(sft):
    out, meta, expected = sft
    tok = Tokenizer(out / "tokenizer.model")
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "sft" and meta["split_method"] == "examples" and meta["tokenizer_trained"]
    assert meta["vocab_size"] == 320 and meta["tokenizer_sha256"] == sha256_file(out / "tokenizer.model")
    assert meta["sft"] == {"prompt_field": "prompt", "response_field": "response"}
    assert meta["inputs"]["files"] == 2 and meta["inputs"]["records"] == 32
    assert meta["cleaning"]["changed"] == 1 and meta["cleaning"]["duplicates"] == 1
    assert len(expected["val"]) == 3
    files = {"meta.json", "tokenizer.model", "verified.json", "train_index.npy", "val_index.npy", "train_00000_0000.bin",
             "val_00000_0000.bin"}
    assert {p.name for p in out.iterdir()} == files and no_temp_folders(out.parent)
    for name, examples in expected.items():
        split = meta["splits"][name]
        index = np.load(out / split["index"]["file"])
        assert split["index"]["sha256"] == sha256_file(out / split["index"]["file"])
        assert index.dtype == np.int64 and index.shape == (len(examples), 3) == (split["examples"], 3)
        stream = TokenWindows(out, name, seq_len=1).tokens(0, split["tokens"]).tolist()
        assert index[0, 0] == 0 and (index[1:, 0] == index[:-1, 0] + index[:-1, 2]).all()
        assert index[:, 2].sum() == len(stream) == split["tokens"]
        for (start, prompt_len, total), (prompt, response) in zip(index.tolist(), examples):
            assert stream[start:start + total] == encode_example(tok, prompt, response)
            assert prompt_len == 1 + len(tok.encode(prompt))
            assert tok.decode(stream[start + 1:start + prompt_len]) == prompt
        assert split["prompt_tokens"] == index[:, 1].sum()
        assert split["response_tokens"] == (index[:, 2] - index[:, 1]).sum()
        assert split["chars"] == sum(len(p) + len(r) for p, r in examples)


def test_existing_tokenizer_and_parallel_encoding_give_identical_data(sft, tmp_path, monkeypatch):
    out, meta, _ = sft
    write_inputs(tmp_path / "in")
    monkeypatch.setattr(encode, "ENCODE_BATCH_BYTES", 200)  # several batches, so the worker pool is used
    again = prepare.prepare(["--sft", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                             "--tokenizer", str(out / "tokenizer.model"), "--workers", "2"])
    assert again["splits"] == meta["splits"] and again["tokenizer_trained"] is False
    for name in ("train_index.npy", "val_index.npy", "train_00000_0000.bin", "val_00000_0000.bin"):
        assert (tmp_path / "out" / name).read_bytes() == (out / name).read_bytes()


def test_custom_fields_and_no_validation_split(sft, tmp_path, capsys):
    records = [{"instruction": f"say {w}", "output": f"{w}!"} for w in WORDS]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = run_prepare("--sft", "--input", tmp_path / "x.jsonl", "--out", tmp_path / "out", "--prompt-field",
                       "instruction", "--response-field", "output", "--val-fraction", 0,
                       "--tokenizer", sft[0] / "tokenizer.model")
    assert meta["splits"]["train"]["examples"] == len(WORDS) and meta["splits"]["val"]["examples"] == 0
    report = capsys.readouterr().out
    assert re.search(rf"^train: {len(WORDS)} examples, [\d,]+ characters, [\d,]+ prompt \+ [\d,]+ response tokens",
                     report, re.MULTILINE)
    assert re.search(rf"^prepared {len(WORDS)} examples, ", report, re.MULTILINE)
    train = SFTExamples(tmp_path / "out", "train", seq_len=64)
    tok = Tokenizer(tmp_path / "out/tokenizer.model")
    assert tok.decode(train[0][0]).startswith(f"say {WORDS[0]}{WORDS[0]}!")
    with pytest.raises(UserError, match="val split of .* holds no examples"):
        SFTExamples(tmp_path / "out", "val", seq_len=64)
    with pytest.raises(UserError, match=rf"none of the {len(WORDS)} examples of the train split .* fits: every prompt "
                                        r"\(with bos\) is longer than seq_len = 2 tokens; use a larger seq_len"):
        SFTExamples(tmp_path / "out", "train", seq_len=2)


def test_pretraining_folders_have_kind_pretrain_and_old_ones_default_to_it(sft, tmp_path):
    (tmp_path / "a.txt").write_text("plain pretraining text, long enough to keep around. " * 30)
    meta = run_prepare("--input", tmp_path / "a.txt", "--out", tmp_path / "out", "--tokenizer",
                       sft[0] / "tokenizer.model")
    assert meta["kind"] == "pretrain" and read_meta(tmp_path / "out")["kind"] == "pretrain"
    assert type(open_split(tmp_path / "out", "train", 16)) is TokenWindows
    assert type(open_split(sft[0], "train", 512)) is SFTExamples
    with pytest.raises(UserError, match="holds pretrain data, not fine-tuning examples; .*prepare --sft"):
        SFTExamples(tmp_path / "out", "train", seq_len=16)
    del meta["kind"]  # a folder written before fine-tuning existed
    (tmp_path / "out/meta.json").write_text(json.dumps(meta))
    assert read_meta(tmp_path / "out")["kind"] == "pretrain"
    (tmp_path / "out/meta.json").write_text(json.dumps({**meta, "kind": "rlhf"}))
    with pytest.raises(UserError, match="has kind 'rlhf'; this code reads pretrain or sft"):
        read_meta(tmp_path / "out")


# ---------------------------------------------------------------------------------------------- SFTExamples

def test_rows_hold_inputs_and_targets_masked_on_prompt_and_padding(sft):
    out, meta, expected = sft
    tok = Tokenizer(out / "tokenizer.model")
    longest = max(len(encode_example(tok, p, r)) for p, r in expected["train"])
    seq_len = longest - 1 + 5  # every example fits, with some padding after the longest
    data = SFTExamples(out, "train", seq_len=seq_len)
    assert len(data) == len(expected["train"]) and data.dropped == data.truncated == 0
    for item, (prompt, response) in zip(data, expected["train"]):
        s = torch.tensor(encode_example(tok, prompt, response))
        n, p = len(s) - 1, 1 + len(tok.encode(prompt))  # real positions; prompt length counting bos
        inputs, targets = item
        assert item.dtype == torch.int64 and item.shape == (2, seq_len)
        assert tok.decode(inputs).startswith(prompt) and tok.decode(inputs) == prompt + response
        assert torch.equal(inputs[:n], s[:-1]) and (inputs[n:] == tok.eos_id).all()
        assert (targets[:p - 1] == -100).all() and (targets[n:] == -100).all()  # prompt and padding
        assert torch.equal(targets[p - 1:n], s[p:])  # every response token and the eos
        assert targets[n - 1] == tok.eos_id


def test_long_examples_are_truncated_and_prompts_filling_the_window_dropped(sft):
    out, meta, expected = sft
    tok = Tokenizer(out / "tokenizer.model")
    index = np.load(out / "train_index.npy")
    prompt_lens, totals = index[:, 1], index[:, 2]
    seq_len = int(np.sort(prompt_lens)[len(prompt_lens) // 2])  # about half the prompts fill the window
    dropped = int((prompt_lens > seq_len).sum())
    truncated = int(((prompt_lens <= seq_len) & (totals > seq_len + 1)).sum())
    assert dropped > 0 and truncated > 0
    with pytest.warns(UserWarning, match=rf"train split .*: {dropped} of {len(index)} examples dropped .*"
                                         rf"{truncated} truncated to seq_len \+ 1 = {seq_len + 1} tokens"):
        data = SFTExamples(out, "train", seq_len=seq_len)
    assert len(data) == len(index) - dropped and (data.dropped, data.truncated) == (dropped, truncated)
    kept = [e for e, p in zip(expected["train"], prompt_lens) if p <= seq_len]
    for item, (prompt, response) in zip(data, kept):
        s = torch.tensor(encode_example(tok, prompt, response))[:seq_len + 1]
        p = 1 + len(tok.encode(prompt))
        assert torch.equal(item[0, :len(s) - 1], s[:-1]) and torch.equal(item[1, p - 1:len(s) - 1], s[p:])
        assert (item[1] != -100).sum() == len(s) - p >= 1

    boundary = int(np.argmin(prompt_lens))  # the window just holds the prompt and the first response token
    p = int(prompt_lens[boundary])
    with pytest.warns(UserWarning):
        exact = SFTExamples(out, "train", seq_len=p)
    first = exact[[i for i, row in enumerate(exact.examples) if row[0] == index[boundary, 0]][0]]
    assert (first[1] != -100).sum() == 1 and first[1, p - 1] == encode_example(tok, *expected["train"][boundary])[p]


def test_sampler_dataloader_and_pickling(sft):
    out, _, _ = sft
    data = SFTExamples(out, "train", seq_len=64)
    order = SampleOrder(len(data), seed=3)
    [batch] = StepBatches(data, order, rank=1, size=2).step(position=8, batch_size=4, grad_accum=1)
    assert batch.shape == (4, 2, 64)
    assert torch.equal(batch[0], data[order.indices(8 + 4, 1)[0]])  # rank 1 reads the second run of 4
    loaded = next(iter(DataLoader(data, batch_size=4, sampler=order.indices(12, 4))))
    assert torch.equal(loaded, batch)
    inputs, targets = inputs_and_targets(batch)
    assert torch.equal(inputs, batch[:, 0]) and torch.equal(targets, batch[:, 1])
    windows = torch.arange(20).view(2, 10)
    assert [t.tolist() for t in inputs_and_targets(windows)] == [windows[:, :-1].tolist(), windows[:, 1:].tolist()]
    clone = pickle.loads(pickle.dumps(data))
    assert torch.equal(clone[5], data[5])


@pytest.mark.parametrize("damage, pattern", [
    (lambda d: (d / "train_index.npy").unlink(), "example index .*train_index.npy is missing"),
    (lambda d: (d / "train_index.npy").write_bytes(b"x" + (d / "train_index.npy").read_bytes()[1:]),
     "train_index.npy does not match its checksum"),
])
def test_damaged_index(sft, tmp_path, damage, pattern):
    folder = tmp_path / "copy"
    shutil.copytree(sft[0], folder)
    damage(folder)
    with pytest.raises(UserError, match=pattern) as error:
        SFTExamples(folder, "train", seq_len=64)
    assert "re-run `python -m hvd_llama.prepare`" in str(error.value)


# ------------------------------------------------------------------------------------------- the masked loss

@pytest.fixture(scope="module")
def model_and_batch(sft):
    out, meta, _ = sft
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=meta["vocab_size"],
                                    max_seq_len=64))
    data = SFTExamples(out, "train", seq_len=64)
    by_length = np.argsort(data.examples[:, 2], kind="stable").tolist()
    rows = by_length[:4] + by_length[-2:]  # short examples with padding, long ones truncated
    batch = torch.stack([data[i] for i in rows])
    return model, data.examples[rows], batch


def cross_entropy(logits, targets):
    """The training loss of one micro-batch alone: summed token losses over its target count."""
    return token_losses(logits, targets).sum() / count_targets(targets)


def hand_masked_cross_entropy(logits, targets):
    total, count = 0.0, 0
    for b in range(targets.shape[0]):
        for j in range(targets.shape[1]):
            if targets[b, j] != -100:
                total -= torch.log_softmax(logits[b, j].double(), dim=-1)[targets[b, j]].item()
                count += 1
    return total / count


def test_response_only_loss_equals_hand_computed_masked_cross_entropy(model_and_batch):
    model, examples, batch = model_and_batch
    inputs, targets = inputs_and_targets(batch)
    seq_len = inputs.shape[1]
    with torch.no_grad():
        logits = model(inputs)
        loss = cross_entropy(logits, targets).item()
    assert (examples[:, 2] <= seq_len).sum() >= 2 and (examples[:, 2] > seq_len + 1).sum() == 2
    with_prompt = torch.from_numpy(examples[:, 1] > 1)
    assert with_prompt.sum() >= 4 and (targets[with_prompt, 0] == -100).all()  # prompt left out
    assert (targets[:4, -1] == -100).all()  # padding left out
    assert loss == pytest.approx(hand_masked_cross_entropy(logits, targets), rel=1e-6)
    with torch.no_grad():  # causal attention: a padded row computes what the example alone computes
        for row, (_, _, total) in zip(inputs, examples):
            n = int(min(total, seq_len + 1)) - 1
            alone = model(row[None, :n])[0]
            padded = model(row[None])[0, :n]
            assert torch.allclose(alone, padded, atol=1e-5)


def test_prompt_targets_do_not_move_the_loss(model_and_batch):
    model, examples, batch = model_and_batch
    inputs, targets = inputs_and_targets(batch)
    masked = targets == -100
    with torch.no_grad():
        logits = model(inputs)
    # unmasked next tokens: the inputs shifted left, plus the last target of a row that fills the window
    raw = torch.cat([inputs[:, 1:], targets[:, -1:]], dim=1)
    assert torch.equal(raw[~masked], targets[~masked])
    prompt = torch.zeros_like(masked)
    for b, (_, prompt_len, _) in enumerate(examples):
        prompt[b, :prompt_len - 1] = True
    assert prompt.any()
    changed = raw.clone()
    changed[prompt] = (raw[prompt] + 7) % logits.shape[-1]
    base_loss = cross_entropy(logits, raw.masked_fill(masked, -100))
    assert cross_entropy(logits, changed.masked_fill(masked, -100)) == base_loss
    first_response = (~masked).int().argmax(dim=1)
    moved = raw.clone()
    moved[0, first_response[0]] = (moved[0, first_response[0]] + 7) % logits.shape[-1]
    assert cross_entropy(logits, moved.masked_fill(masked, -100)) != base_loss  # the test can tell


def test_masked_positions_get_no_gradient(model_and_batch):
    model, _, batch = model_and_batch
    inputs, targets = inputs_and_targets(batch)
    logits = model(inputs)
    logits.retain_grad()
    cross_entropy(logits, targets).backward()
    masked = targets == -100
    assert not logits.grad[masked].any()  # prompt and padding positions: exactly zero
    assert (logits.grad[~masked].abs().sum(-1) > 0).all()
    model.zero_grad()


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("content, pattern", [
    ('{"prompt": "p", "response": "r"}\n{"prompt": "only a prompt"}\n',
     r"a\.jsonl:2 has no response field 'response' \(it has: prompt\); choose one with --response-field"),
    ('{"question": "q", "response": "r"}\n', r"a\.jsonl:1 has no prompt field 'prompt' \(it has: question, response\)"),
    ('{"prompt": "p", "response": "r"}\n\nnot json\n', r"a\.jsonl:3 is not valid JSON"),
    ('{"prompt": 3, "response": "r"}\n', r"a\.jsonl:1: the prompt field 'prompt' holds int, expected a string"),
    ('["prompt", "response"]\n', r"a\.jsonl:1 has no prompt field 'prompt' \(it has: list\)"),
    ("\n  \n", r"no fine-tuning examples in 1 file\(s\) \(4 bytes\): --sft needs JSON lines with 'prompt' and"),
    ('{"prompt": "p", "response": "r"}\n', r"1 example\(s\) are too few to hold out --val-fraction 0\.1"),
])
def test_bad_examples(tmp_path, content, pattern):
    (tmp_path / "a.jsonl").write_text(content)
    with pytest.raises(UserError, match=pattern):
        run_prepare("--sft", "--input", tmp_path / "a.jsonl", "--out", tmp_path / "out", "--vocab-size", 300)
    assert not (tmp_path / "out").exists() and no_temp_folders(tmp_path)


def test_cli_one_line_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p"}\n')
    cases = [((), r"a\.jsonl:1 has no response field 'response'"),
             (("--prompt-field", "x", "--response-field", "x"),
              "--prompt-field and --response-field are both 'x'; they must differ")]
    for extra, pattern in cases:
        result = subprocess.run([sys.executable, "-m", "hvd_llama.prepare", "--sft", "--input",
                                 str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"), *extra],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert re.fullmatch(f"error: .*{pattern}.*", last), last
        assert not (tmp_path / "out").exists() and no_temp_folders(tmp_path)
