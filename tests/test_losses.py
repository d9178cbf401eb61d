"""Exact losses (issue 14): a step's loss is its token losses summed over the step's global target count, so
fine-tuning rows of different lengths give the same step however the batch is split across ranks and
micro-steps; validation covers the split evenly, and the last figure is `evaluate`'s on the final checkpoint."""
import json
import random
import subprocess
import sys

import pytest
import torch
from support import REPO
from support.models import MICRO, tiny_model, tokens
from support.multiproc import job_env
from support.trainrun import losses, metrics, micro_overrides, train_job, train_single

from hvd_llama.tokenizer import Tokenizer
from hvd_llama.training.compute import count_targets, model_token_losses, spread_selection
from hvd_llama.training.data import SFTExamples, inputs_and_targets

WORDS = ("the king and queen of england shall speak to thee my lord good night sweet prince what light through "
         "yonder window breaks it is the east and juliet is the sun").split()


@pytest.fixture(scope="module")
def varied_sft(data_dir, tmp_path_factory):
    """Fine-tuning examples whose responses have 1 to ~40 tokens, encoded with data_dir's tokenizer."""
    rng = random.Random(0)
    examples = [{"prompt": f"say {rng.choice(WORDS)} {i}:", "response": " ".join(rng.choices(WORDS, k=rng.randint(1, 16)))}
                for i in range(300)]
    root = tmp_path_factory.mktemp("varied")
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(e) for e in examples))
    done = subprocess.run([sys.executable, "-m", "hvd_llama.prepare", "--sft", "--input", str(root / "pairs.jsonl"),
                           "--out", str(root / "data"), "--tokenizer", str(data_dir / "tokenizer.model"),
                           "--val-fraction", "0.1", "--workers", "1"], cwd=REPO, env=job_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    tokenizer = Tokenizer(data_dir / "tokenizer.model")
    lengths = [len(tokenizer.encode(e["response"])) for e in examples]
    assert min(lengths) <= 2 and max(lengths) >= 35  # the spread the test is about
    return root / "data"


def sft_values(data, **extra) -> list:
    return micro_overrides(data, **{"train.seq_len": 56, "optim.weight_decay": 0.1, "optim.grad_clip": 0.5, **extra})


def final_weights(run_dir):
    return torch.load(sorted((run_dir / "checkpoints").iterdir())[-1] / "model.pt")


def test_micro_batches_have_different_target_counts(varied_sft):
    """What a mean of per-micro-batch means gets wrong: rows of one step with different numbers of targets
    (the end-to-end test below fails with that normalisation; checked when it was written)."""
    rows = SFTExamples(varied_sft, "train", 56)
    counts = [count_targets(inputs_and_targets(rows[i][None])[1]) for i in range(len(rows))]
    assert min(counts) <= 3 and max(counts) >= 30
    assert sum(counts[:3]) != sum(counts[3:6])


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_and_micro_steps_do_not_change_a_fine_tuning_step(varied_sft, tmp_path):
    one = train_single(tmp_path / "one", sft_values(varied_sft, **{"train.batch_size": 6}))
    accum = train_single(tmp_path / "accum", sft_values(varied_sft, **{"train.batch_size": 3, "train.grad_accum": 2}))
    two = train_job(tmp_path / "two", sft_values(varied_sft, **{"train.batch_size": 3}))
    sharded = train_job(tmp_path / "sharded", sft_values(varied_sft, **{"train.batch_size": 3, "dist.zero_stage": 2}))
    assert one.returncode == 0 and accum.returncode == 0, one.stderr[-2000:] + accum.stderr[-2000:]
    assert two.returncode == 0 and sharded.returncode == 0, two.output[-3000:] + sharded.output[-3000:]
    reference = losses(tmp_path / "one")
    assert len(reference) == 5 and len(set(reference)) == 5
    for other in ("accum", "two", "sharded"):
        assert losses(tmp_path / other) == pytest.approx(reference, rel=1e-5), other
        weights, expected = final_weights(tmp_path / other), final_weights(tmp_path / "one")
        for key in expected:  # relative to each tensor's norm: Adam magnifies rounding in its tiniest elements
            assert (weights[key] - expected[key]).norm() <= 1e-5 * expected[key].norm(), (other, key)


def evaluate_json(run_dir, tmp_path) -> dict:
    out = tmp_path / "eval.json"
    done = subprocess.run([sys.executable, "-m", "hvd_llama.evaluate", "--checkpoint", str(run_dir), "--json", str(out)],
                          cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_last_validation_is_what_evaluate_reports(kind, small_data, varied_sft, tmp_path):
    data, eval_windows = (small_data, 5) if kind == "pretrain" else (varied_sft, 4)
    run_dir = tmp_path / kind
    done = train_single(run_dir, sft_values(data, **{"train.max_steps": 4, "train.eval_every": 2,
                                                     "train.eval_windows": eval_windows}))
    assert done.returncode == 0, done.stderr[-3000:]
    records = [r for r in metrics(run_dir) if "val_loss" in r]
    figures = evaluate_json(run_dir, tmp_path)
    assert [r["val_windows"] for r in records] == [eval_windows, figures["windows"]]
    assert figures["windows"] > 3 * eval_windows
    assert records[-1]["val_tokens"] == figures["tokens"]
    assert records[-1]["val_loss"] == pytest.approx(figures["loss_per_token"], rel=1e-6)
    assert f"val loss {records[-1]['val_loss']:.4f}" in done.stdout.strip().splitlines()[-1]
    if kind == "finetune":  # responses only: fewer targets than tokens in the split, no characters
        assert figures["nats_per_char"] is None and figures["characters"] is None


def test_spread_selection_covers_the_split_evenly():
    picked = spread_selection(1000, 10, seed=3)
    assert picked == spread_selection(1000, 10, seed=3) != spread_selection(1000, 10, seed=4)
    assert [p // 100 for p in picked] == list(range(10))  # one per tenth of the split
    assert spread_selection(7, 0, seed=1) == spread_selection(7, 9, seed=1) == list(range(7))


# The loss a chunk of tokens at a time (train.loss_chunk): the same losses and gradients, less saved for backward.
def losses_grads_saved(model, inputs, targets, chunk: int, precision: str = "fp32"):
    """Per-token losses, every gradient, and the bytes autograd saved for backward during the forward."""
    model.zero_grad()
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        losses = model_token_losses(model, inputs, targets, torch.device("cpu"), precision, chunk)
    losses.sum().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


@pytest.mark.parametrize("chunk", [32, 48])  # 128 tokens: 4 equal chunks, or 48 + 48 + 32
def test_chunked_loss_equals_the_whole_one_and_saves_less(chunk):
    model = tiny_model(MICRO)
    batch = tokens(4, 33, seed=1, vocab=MICRO.vocab_size)
    inputs, targets = batch[:, :-1], batch[:, 1:].clone()
    targets[0, :5] = -100  # masked targets (a fine-tuning prompt) inside the first chunk
    whole, whole_grads, whole_saved = losses_grads_saved(model, inputs, targets, chunk=0)
    chunked, chunked_grads, chunked_saved = losses_grads_saved(model, inputs, targets, chunk)
    assert chunked.shape == whole.shape == (128,) and bool((chunked[:5] == 0).all())
    assert (chunked - whole).abs().max().item() <= 1e-6
    for name, grad in whole_grads.items():  # the output head's gradient is a sum over chunks: fp32 rounding
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    # The whole loss keeps full-vocabulary tensors (log_softmax's output: 4 bytes x 128 tokens x 512); the
    # chunked one keeps none: checkpointing holds only each chunk's hidden-state input (a view, 4 x 128 x 64
    # bytes in all, not seen by the hooks), and recomputes its logits in backward.
    logits_bytes, hidden_bytes = 4 * 128 * 512, 4 * 128 * 64
    assert chunked_saved + hidden_bytes <= whole_saved - logits_bytes


def relative_error(grads: dict, reference: dict) -> float:
    return max(((grads[n] - g).norm() / g.norm()).item() for n, g in reference.items())


def test_chunked_loss_under_bf16_autocast_is_as_accurate_and_equal_without_grad():
    model = tiny_model(MICRO)
    batch = tokens(2, 65, seed=2, vocab=MICRO.vocab_size)
    inputs, targets, cpu = batch[:, :-1], batch[:, 1:], torch.device("cpu")
    _, reference, _ = losses_grads_saved(model, inputs, targets, 0, "fp32")
    whole, whole_grads, _ = losses_grads_saved(model, inputs, targets, 0, "bf16")
    chunked, chunked_grads, _ = losses_grads_saved(model, inputs, targets, 40, "bf16")
    assert (chunked - whole).abs().max().item() <= 1e-6
    # bf16 matmul gradients differ from fp32 by bf16 rounding (~1% here); each chunk's head gradient is
    # rounded on its own, and summed in fp32: no further from fp32 than the whole loss's.
    whole_error = relative_error(whole_grads, reference)
    assert whole_error < 0.02 and relative_error(chunked_grads, reference) <= 1.25 * whole_error
    with torch.no_grad():
        scored = model_token_losses(model, inputs, targets, cpu, "fp32", 40)
        assert (scored - model_token_losses(model, inputs, targets, cpu, "fp32", 0)).abs().max().item() <= 1e-6


@pytest.mark.slow
def test_training_with_a_chunked_loss_takes_the_same_steps_on_two_ranks(data_dir, tmp_path):
    """Under Horovod's gradient hooks: the head's gradient, summed over 5 chunks of 24/8 tokens, is reduced once."""
    runs = {}
    for chunk in (0, 24):  # 4 x 32 tokens per rank: chunks of 24, the last one 8
        run_dir = tmp_path / f"chunk{chunk}"
        job = train_job(run_dir, micro_overrides(data_dir, **{"train.loss_chunk": chunk, "train.max_steps": 4}))
        assert job.returncode == 0, job.output[-3000:]
        runs[chunk] = losses(run_dir)
    assert len(runs[0]) == 4 and runs[24] == pytest.approx(runs[0], rel=1e-5, abs=1e-6)
