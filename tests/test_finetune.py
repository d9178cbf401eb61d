"""Fine-tuning through the training application: --init-from, SFT data, full and LoRA, under Horovod."""
import hashlib
import json
import random
import subprocess
import sys

import pytest
import torch
from support import REPO
from support.multiproc import job_env, run_job
from support.trainrun import TRAIN_DIGESTS, losses, metrics, micro_overrides, train_job, train_single

from hvd_llama.config import load_config
from hvd_llama.training.builder import load_pretrained
from hvd_llama.training.data import read_meta
from hvd_llama.use.decoding import generate
from hvd_llama.use.inference import load_model

pytestmark = pytest.mark.distributed


def run(*args):
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=job_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def reversal_examples(n: int, seed: int) -> list:
    rng = random.Random(seed)
    digits = ["".join(rng.choice("0123456789") for _ in range(4)) for _ in range(n)]
    return [{"prompt": f"{d}=", "response": d[::-1]} for d in digits]


@pytest.fixture(scope="module")
def reversal_data(data_dir, tmp_path_factory):
    """Prompt/response pairs 'abcd=' -> 'dcba', encoded with the base model's tokenizer."""
    root = tmp_path_factory.mktemp("sft")
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(e) for e in reversal_examples(3000, seed=0)))
    run("hvd_llama.prepare", "--sft", "--input", str(root / "pairs.jsonl"), "--out", str(root / "data"),
        "--tokenizer", str(data_dir / "tokenizer.model"), "--val-fraction", "0.05")
    return root / "data"


def sft_overrides(data, **extra):
    values = {"data.dir": str(data), "train.seq_len": 16, "train.batch_size": 32, "train.eval_every": 0,
              "optim.warmup_steps": 10, "optim.lr": 3e-3, "optim.min_lr": 3e-4, "optim.weight_decay": 0.0,
              "checkpoint.every": 0, "log.peak_flops": 1e11, "log.every": 50}
    values.update(extra)
    return [item for key, value in values.items() for item in ("--set", f"{key}={value}")]


def exact_match_accuracy(checkpoint, examples) -> float:
    model, tokenizer, _ = load_model(checkpoint)
    prompts = [tokenizer.encode(e["prompt"], bos=True) for e in examples]
    outputs = generate(model, prompts, max_new_tokens=6, temperature=0.0, eos_id=tokenizer.eos_id)
    return sum(tokenizer.decode(o) == e["response"] for o, e in zip(outputs, examples)) / len(examples)


@pytest.mark.slow
def test_full_fine_tune_learns_to_reverse(micro_run, reversal_data, tmp_path):
    run_dir = tmp_path / "ft"
    done = train_single(run_dir, sft_overrides(reversal_data, **{"train.max_steps": 600}), "--init-from", str(micro_run),
                        timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = {e["prompt"] for e in reversal_examples(3000, seed=0)}
    held_out = [e for e in reversal_examples(400, seed=1) if e["prompt"] not in seen][:100]
    assert exact_match_accuracy(micro_run, held_out) < 0.05
    assert exact_match_accuracy(run_dir, held_out) > 0.95


@pytest.mark.slow
def test_init_from_hf_export_reproduces_validation_loss(micro_run, data_dir, tmp_path):
    hf = tmp_path / "hf"
    run("hvd_llama.convert", "export", "--checkpoint", str(micro_run), "--out", str(hf))
    source = tmp_path / "source"  # the base model itself, evaluated before any step
    again = tmp_path / "from_hf"
    common = {"train.max_steps": 1, "train.eval_at_start": "true", "train.eval_windows": 32}
    assert train_single(source, micro_overrides(data_dir, **common), "--init-from", str(micro_run)).returncode == 0
    done = train_single(again, micro_overrides(data_dir, **common), "--init-from", str(hf))
    assert done.returncode == 0, done.stderr[-3000:]
    first = metrics(again)[0]
    assert first["step"] == 0 and "loss" not in first
    assert first["val_loss"] == pytest.approx(metrics(source)[0]["val_loss"], rel=1e-6)


def test_init_from_refuses_data_of_another_tokenizer(micro_run, tmp_path):
    other = tmp_path / "other"
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(4000)))
    run("hvd_llama.prepare", "--input", str(corpus), "--out", str(other), "--vocab-size", "300")
    done = train_single(tmp_path / "run", micro_overrides(other, **{"model.vocab_size": 300}), "--init-from",
                        str(micro_run))
    assert done.returncode == 2 and "encoded with another tokenizer" in done.stderr


def test_elastic_worker_joining_a_running_job_reads_the_architecture_itself(micro_run, small_data):
    """A worker added to a running elastic job may make no collective (the others are training; here Horovod is
    not even initialised, so one would raise): it adopts the base model's architecture from the files, and
    receives the weights in the state's sync."""
    cfg = load_config(None, [f"data.dir={small_data}", f"finetune.init_from={micro_run}", "train.seq_len=32"])
    assert load_pretrained(cfg, read_meta(small_data), joining=True) is None
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.max_seq_len) == (64, 2, 64)  # not the defaults


@pytest.mark.slow
def test_lora_under_horovod(micro_run, reversal_data, tmp_path):
    lora = {"finetune.lora_rank": 4, "finetune.lora_alpha": 8, "train.max_steps": 5, "train.batch_size": 8}
    one = tmp_path / "one"
    single = train_single(one, sft_overrides(reversal_data, **{**lora, "train.batch_size": 16}), "--init-from",
                          str(micro_run))
    assert single.returncode == 0, single.stderr[-3000:]
    two = tmp_path / "two"
    job = train_job(two, sft_overrides(reversal_data, **lora), "--init-from", str(micro_run))
    assert job.returncode == 0, job.output[-3000:]
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert "replicas identical" in job.output and "allreduce per step" in job.output
    saved = sorted(p.name for p in (two / "checkpoints" / "step_00000005").iterdir())
    assert "adapter.pt" in saved and "model.pt" not in saved
    adapters = torch.load(two / "checkpoints" / "step_00000005" / "adapter.pt")
    assert all("lora_" in key for key in adapters)
    # Base weights stay bit-identical on both ranks; the adapters agree across ranks.
    values = [v for v in sft_overrides(reversal_data, **lora) if v != "--set"] + [f"finetune.init_from={micro_run}"]
    job = run_job([str(TRAIN_DIGESTS), str(tmp_path / "digests"), *values], np=2)
    assert job.returncode == 0, job.output[-3000:]
    base_state = torch.load(sorted((micro_run / "checkpoints").iterdir())[-1] / "model.pt")
    expected = hashlib.sha256(b"".join(base_state[k].numpy().tobytes() for k in sorted(base_state))).hexdigest()
    for rank in (0, 1):
        lines = job.lines(rank)
        assert [l for l in lines if l.startswith("BASE")][-1] == f"BASE {expected}"
    assert [l for l in job.lines(0) if l.startswith("LORA")] == [l for l in job.lines(1) if l.startswith("LORA")]


def test_lora_checkpoint_merges_for_evaluate_and_export(micro_run, reversal_data, tmp_path):
    lora = {"finetune.lora_rank": 4, "finetune.lora_alpha": 8, "train.max_steps": 3}
    run_dir = tmp_path / "lora"
    assert train_single(run_dir, sft_overrides(reversal_data, **lora), "--init-from", str(micro_run)).returncode == 0
    merged, _, _ = load_model(run_dir)
    plain, _, _ = load_model(micro_run)
    tokens = torch.randint(0, 512, (2, 12))
    assert not torch.allclose(merged(tokens), plain(tokens))  # the adapters changed the model
    hf = tmp_path / "hf"
    run("hvd_llama.convert", "export", "--checkpoint", str(run_dir), "--out", str(hf))
    exported, _, _ = load_model(hf)
    assert torch.allclose(exported(tokens), merged(tokens), atol=1e-5)


@pytest.mark.parametrize("preset", ["finetune_full", "finetune_lora"])
def test_shipped_fine_tuning_presets_run(micro_run, reversal_data, tmp_path, preset):
    run_dir = tmp_path / preset
    done = train_single(run_dir, ["--config", f"configs/{preset}.yaml", "--init-from", str(micro_run),
                                  *sft_overrides(reversal_data, **{"train.max_steps": 2, "train.eval_windows": 8})])
    assert done.returncode == 0, done.stderr[-3000:]
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]  # eval_at_start from the preset, then two steps
    assert "val_loss" in records[0] and all(r["loss"] > 0 for r in records[1:])
    weights = "adapter.pt" if preset == "finetune_lora" else "model.pt"
    assert (run_dir / "checkpoints" / "step_00000002" / weights).is_file()


@pytest.mark.slow
def test_init_from_a_tied_hf_folder_on_two_ranks_equals_one_rank(small_data, tmp_path):
    """tie_word_embeddings: ranks > 0 used to untie the output head when allocating, and died at start-up."""
    tied = micro_overrides(small_data, **{"model.tie_embeddings": "true", "train.max_steps": 2})
    assert train_single(tmp_path / "base", tied).returncode == 0
    hf = tmp_path / "hf"
    run("hvd_llama.convert", "export", "--checkpoint", str(tmp_path / "base"), "--out", str(hf))
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    single = train_single(tmp_path / "one", micro_overrides(small_data, **{"train.batch_size": 8}), "--init-from",
                          str(hf))
    assert single.returncode == 0, single.stderr[-3000:]
    job = train_job(tmp_path / "two", micro_overrides(small_data), "--init-from", str(hf))
    assert job.returncode == 0, job.output[-3000:]
    assert "replicas identical" in job.output
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
