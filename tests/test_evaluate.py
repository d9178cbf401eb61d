"""Evaluation: figures checked by hand, every token scored once, horovodrun equals one process, int8, bad input."""
import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import REPO
from support.data import flip_token_keeping_size_and_mtime
from support.multiproc import job_env, run_job, run_one_process

from hvd_llama.cli import UserError
from hvd_llama.evaluate import EvaluateConfig, evaluate, parse_args, token_byte_lengths
from hvd_llama.training.compute import item_batches
from hvd_llama.training.data import ArrayWindows, TokenWindows, read_meta
from hvd_llama.use.inference import load_model

FIGURES = ("loss_sum_nats", "loss_per_token", "perplexity", "nats_per_char", "bits_per_byte")
SAMPLE = 'def greet(name):\n    return f"Café, naïve — façade ✓ ½ {name}"\n\n'  # multi-byte characters


def evaluate_cli(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    result = run_one_process("hvd_llama.evaluate", *args, "--threads", 1, "--json", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == "horovod imported: False"  # one process: Horovod not even loaded
    assert len(result.stdout.splitlines()) == 1 and result.stdout.startswith("eval ")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def loaded(micro_run):  # noqa: F811
    model, tokenizer, config = load_model(micro_run)
    return model, tokenizer, config


@pytest.fixture(scope="module")
def fp32_default(micro_run, tmp_path_factory):  # noqa: F811
    """One process, no --data/--text: the val split of the data folder the checkpoint was trained on."""
    return evaluate_cli(tmp_path_factory.mktemp("eval"), "fp32", "--checkpoint", micro_run)


def test_scored_windows_cover_every_target_once():
    for n_tokens, seq_len, batch_size in [(2, 4, 3), (65, 32, 2), (66, 32, 2), (100, 7, 4)]:
        windows = ArrayWindows(np.arange(n_tokens), seq_len)
        batches = item_batches(windows, range(len(windows)), batch_size)
        targets = [int(t) for batch in batches for i in batch for t in windows[i][1:]]
        assert targets == list(range(1, n_tokens))
        assert all(len(b) <= batch_size and len({len(windows[i]) for i in b}) == 1 for b in batches)


def test_byte_lengths_sum_to_utf8_length(loaded):
    _, tokenizer, _ = loaded
    ids = tokenizer.encode(SAMPLE, bos=True, eos=True)
    assert token_byte_lengths(tokenizer)[ids].sum() == len(SAMPLE.encode("utf-8")) > len(SAMPLE)


def test_text_figures_equal_hand_computation(loaded, micro_run, tmp_path):  # noqa: F811
    model, tokenizer, config = loaded
    seq_len = config["train"]["seq_len"]
    text = SAMPLE * 3
    while (len(tokenizer.encode(text)) + 1) % seq_len == 0:  # make sure a partial final window is scored
        text += "!"
    path = tmp_path / "sample.txt"
    path.write_text(text, encoding="utf-8")
    figures = evaluate_cli(tmp_path, "text", "--checkpoint", micro_run, "--text", path, "--batch-size", 2)

    tokens = torch.tensor(tokenizer.encode(text, bos=True, eos=True))
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, seq_len):
            window = tokens[start:start + seq_len + 1][None]
            total += F.cross_entropy(model(window[:, :-1])[0], window[0, 1:], reduction="sum").double().item()
    assert figures["tokens"] == len(tokens) - 1
    assert figures["characters"] == len(text) and figures["bytes"] == len(text.encode("utf-8"))
    assert figures["loss_sum_nats"] == pytest.approx(total, rel=1e-6)
    assert figures["nats_per_char"] == pytest.approx(
        figures["loss_per_token"] * figures["tokens"] / len(text), rel=1e-12)
    assert figures["nats_per_char"] == pytest.approx(total / len(text), rel=1e-6)
    assert figures["bits_per_byte"] == pytest.approx(total / math.log(2) / len(text.encode("utf-8")), rel=1e-6)
    assert figures["perplexity"] == pytest.approx(math.exp(total / (len(tokens) - 1)), rel=1e-6)


def test_default_source_is_the_val_split_scored_whole(fp32_default, small_data, loaded):  # noqa: F811
    _, tokenizer, _ = loaded
    split = read_meta(small_data)["splits"]["val"]
    assert fp32_default["source"].endswith("(val)") and fp32_default["quantize"] == "none"
    assert fp32_default["tokens"] == split["tokens"] - 1
    assert fp32_default["characters"] == split["chars"]
    stream = TokenWindows(small_data, "val", 1).tokens(0, split["tokens"])
    assert fp32_default["bytes"] == len(tokenizer.decode(stream.tolist()).encode("utf-8"))
    assert 1 < fp32_default["perplexity"] < 2 * 512  # a barely trained 512-token model


def test_int8_perplexity_close_to_fp32(fp32_default, micro_run, tmp_path):  # noqa: F811
    int8 = evaluate_cli(tmp_path, "int8", "--checkpoint", micro_run, "--quantize", "int8")
    assert int8["quantize"] == "int8" and int8["tokens"] == fp32_default["tokens"]
    assert int8["perplexity"] == pytest.approx(fp32_default["perplexity"], rel=0.03)
    assert int8["loss_sum_nats"] != fp32_default["loss_sum_nats"]  # the int8 model really ran


@pytest.mark.distributed
def test_horovodrun_two_ranks_equal_one_process(fp32_default, micro_run, tmp_path):  # noqa: F811
    out = tmp_path / "np2.json"
    job = run_job(["-m", "hvd_llama.evaluate", "--checkpoint", str(micro_run), "--threads", "1",
                   "--batch-size", "3", "--json", str(out)], np=2)
    assert job.returncode == 0, job.output[-3000:]
    assert [line for line in job.lines(0) if line.startswith("eval ")] and \
        not [line for line in job.lines(1) if line.startswith("eval ")]
    two = json.loads(out.read_text())
    assert two["ranks"] == 2 and fp32_default["ranks"] == 1
    for key in ("tokens", "characters", "bytes"):
        assert two[key] == fp32_default[key]
    for key in FIGURES:  # --batch-size 3 vs 8 changes the batches too, not the figures
        assert two[key] == pytest.approx(fp32_default[key], rel=1e-9), key



def test_verify_data_finds_what_a_stat_cannot_see(loaded, micro_run, tmp_path):  # noqa: F811
    """A val shard corrupted with its size and time kept: evaluate's default check (size and time since the last
    check) cannot see it; --verify-data hashes every shard and refuses in one line naming it."""
    data = tmp_path / "data"
    shutil.copytree(loaded[2]["data"]["dir"], data)  # copy2: times kept, so the shards count as checked
    shard = sorted(data.glob("val_*.bin"))[0]
    flip_token_keeping_size_and_mtime(shard)
    config = EvaluateConfig(str(micro_run), data=str(data), threads=1)
    assert evaluate(config)["tokens"] > 0
    with pytest.raises(UserError, match=f"{shard.name} does not match its checksum"):
        evaluate(replace(config, verify_data=True))
    assert parse_args(["--checkpoint", "c", "--verify-data"]).verify_data

BAD_EVALUATE = {
    "missing checkpoint": (["--checkpoint", "{missing}"], "does not exist"),
    "missing text file": (["--text", "{missing}"], "--text"),
    "window longer than the context": (["--seq-len", "65"], "--seq-len 65 must be between 1 and"),
    "zero batch size": (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
}


@pytest.fixture(scope="module")
def bad_evaluate_runs(micro_run, tmp_path_factory):  # noqa: F811
    """All the bad command lines, started together (each pays Python's and torch's start-up)."""
    missing = tmp_path_factory.mktemp("none") / "absent"
    procs = {}
    for name, (args, _) in BAD_EVALUATE.items():
        args = [a.format(missing=missing) for a in args]
        if "--checkpoint" not in args:
            args = ["--checkpoint", str(micro_run), *args]
        procs[name] = subprocess.Popen([sys.executable, "-m", "hvd_llama.evaluate", *args], cwd=REPO,
                                       env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return {name: (p.communicate(timeout=120)[1], p.returncode)[::-1] for name, p in procs.items()}


@pytest.mark.parametrize("case", BAD_EVALUATE)
def test_bad_input_is_one_line_exit_2(case, bad_evaluate_runs):
    returncode, stderr = bad_evaluate_runs[case]
    assert returncode == 2, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: "), stderr
    assert BAD_EVALUATE[case][1] in stderr


def test_the_flags_become_an_evaluate_config_with_its_defaults():
    """Flags land in their fields, and a flag left out gets the dataclass's default (the only list of them)."""
    cfg = parse_args(["--checkpoint", "ckpt", "--batch-size", "3", "--json", "eval.json"])
    assert cfg == EvaluateConfig("ckpt", batch_size=3, json_path="eval.json")


@pytest.mark.parametrize("args, message", [(["--threads", "-1"], "--threads -1 must be >= 0"),
                                           (["--dtype", "bf16", "--quantize", "int8"], "exclude each other")])
def test_bad_options_are_refused_before_any_checkpoint_is_read(args, message, tmp_path):
    with pytest.raises(UserError, match=message):
        parse_args(["--checkpoint", str(tmp_path / "absent"), *args])
