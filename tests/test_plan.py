"""The memory planner against what PyTorch actually holds: saved tensors, model-state tensors, peak RSS."""
import json
import subprocess
import sys

import pytest
import torch
from support import REPO
from support.multiproc import job_env, run_job

from hvd_llama.cli import UserError
from hvd_llama.config import OptimConfig, load_config
from hvd_llama.lora import apply_lora
from hvd_llama.model import ModelConfig, Transformer
from hvd_llama.plan import main, parse_size
from hvd_llama.training.compute import autocast, token_losses
from hvd_llama.training.memory import (
    GiB,
    activation_bytes,
    check_fits,
    count_params,
    model_state_bytes,
    plan,
    weight_copy_bytes,
    zero_layout,
)
from hvd_llama.training.optim import build_optimizer
from hvd_llama.training.zero_layout import bucket_size

# Odd sizes on purpose: vocabulary, sequence and batch that are not powers of two, head_dim 16.
SHAPES = {"mha": dict(n_heads=6, n_kv_heads=None), "gqa": dict(n_heads=6, n_kv_heads=2),
          "mqa": dict(n_heads=6, n_kv_heads=1)}


def small_model(kind: str) -> ModelConfig:
    return ModelConfig(dim=96, n_layers=3, vocab_size=301, multiple_of=32, max_seq_len=64, **SHAPES[kind])


def measured_saved_bytes(m: ModelConfig, batch: int, seq_len: int, regime: str, checkpointing: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward + loss, parameters excluded."""
    torch.manual_seed(0)
    model = Transformer(m)
    if regime == "half":
        model.to(torch.bfloat16)
    model.set_activation_checkpointing(checkpointing)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    tokens = torch.randint(0, m.vocab_size, (batch, seq_len + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(torch.device("cpu"), "fp32" if regime == "fp32" else "bf16"):
            token_losses(model(tokens[:, :-1]), tokens[:, 1:]).sum()
    return sum(storages.values())


@pytest.mark.parametrize("kind", sorted(SHAPES))
@pytest.mark.parametrize("regime,checkpointing", [("fp32", False), ("fp32", True), ("autocast", False),
                                                  ("half", False), ("half", True)])
def test_activation_bytes_match_saved_tensors(kind, regime, checkpointing):
    m, batch, seq_len = small_model(kind), 3, 37
    measured = measured_saved_bytes(m, batch, seq_len, regime, checkpointing)
    planned = activation_bytes(m, batch, seq_len, regime, checkpointing, saved_only=True)
    if regime == "autocast":  # the half-precision weight copies are saved too
        planned += weight_copy_bytes(count_params(config_of(m)), regime)
    assert planned == pytest.approx(measured, rel=0.03), (measured, planned)


def test_checkpointing_saves_a_fraction():
    m = small_model("gqa")
    full, ckpt = (activation_bytes(m, 4, 64, "fp32", c) for c in (False, True))
    assert ckpt < full / 2


def config_of(model: ModelConfig, *extra: str):
    values = [f"model.{k}={'null' if v is None else v}" for k, v in vars(model).items()]
    return load_config(None, values + ["train.seq_len=32"] + list(extra))


@pytest.mark.parametrize("lora", [False, True])
def test_stage0_model_state_equals_the_tensors(lora):
    """Parameters, gradients after backward and AdamW state after a step, byte for byte."""
    m = small_model("gqa")
    extra = ["finetune.lora_rank=4", "finetune.init_from=x", "finetune.lora_targets=wq,wv,w2"] if lora else []
    cfg = config_of(m, *extra)
    model = Transformer(m)
    if lora:
        apply_lora(model, 4, 8.0, targets=("wq", "wv", "w2"))
    optimizer = build_optimizer(model, cfg.optim)
    tokens = torch.randint(0, m.vocab_size, (2, 17))
    token_losses(model(tokens[:, :-1]), tokens[:, 1:]).sum().backward()
    optimizer.step()
    measured = {
        "weights": sum(p.nbytes for p in model.parameters()),
        "gradients": sum(p.grad.nbytes for p in model.parameters() if p.grad is not None),
        "optimizer": sum(t.nbytes for state in optimizer.state.values() for t in state.values()),
    }
    assert model_state_bytes(count_params(cfg), 0, 1, False, 1) == measured
    if lora:
        assert measured["gradients"] < measured["weights"] / 10


@pytest.mark.parametrize("trainable, configured, expected", [
    (12_600_000, 0, 3_150_000),  # small: a quarter
    (6_700_000_000, 0, 25_000_000), (100_000_000, 0, 25_000_000),  # 25M from 100M parameters up
    (10, 0, 3), (1, 0, 1), (500, 77, 77)])  # a configured size is taken as it is
def test_default_zero_bucket_spans_at_least_four_buckets_up_to_25M(trainable, configured, expected):
    assert bucket_size(trainable, configured) == expected


def test_sharding_shrinks_the_state_and_bf16_halves_the_weights():
    cfg = load_config("configs/llama2-7b.yaml")
    counts = count_params(cfg)
    s0 = model_state_bytes(counts, 0, 8, False, 1)
    s1 = model_state_bytes(counts, 1, 8, True, 1)
    s2 = model_state_bytes(counts, 2, 8, True, 1)
    assert s1["weights"] == s2["weights"] == s0["weights"] // 2
    assert s1["optimizer"] == s2["optimizer"] < s0["optimizer"] / 8 * 1.5 + 1
    assert s2["gradients"] < s1["gradients"] / 2
    # with accumulation the whole gradients exist next to the slice, summed in fp32 (Megatron's main_grad): 4
    # bytes per parameter, every bucket padded to a multiple of the world size, at stage 1 instead of bf16 ones
    S = s2["optimizer"] // 12
    for stage in (1, 2):
        assert model_state_bytes(counts, stage, 8, True, 4)["gradients"] == s2["gradients"] + 4 * 8 * S
    assert 0 <= 8 * S - counts.trainable < 8 * len(zero_layout(counts, 8).buckets)


def run_plan(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


TINY = ("--config", "configs/tiny.yaml", "--device", "cpu")


def test_json_has_the_figures_and_exit_status(capsys):
    code, out, _ = run_plan(capsys, *TINY, "--world-size", "2", "--device-memory", "8GiB", "--json")
    result = json.loads(out)
    assert code == 0 and result["fits"] is True
    for key in ("weights", "gradients", "optimizer", "activations", "total", "max_batch_size"):
        assert isinstance(result[key], int) and result[key] > 0, key
    assert result["total"] > result["weights"] + result["gradients"] + result["optimizer"] + result["activations"]
    code, out, _ = run_plan(capsys, *TINY, "--device-memory", "100MiB", "--json")
    assert code == 1 and json.loads(out)["fits"] is False


def test_fits_boundary(capsys):
    """The suggested micro-batch fits and one more does not."""
    memory = "1GiB"
    _, out, _ = run_plan(capsys, *TINY, "--device-memory", memory, "--json")
    largest = json.loads(out)["max_batch_size"]
    assert largest > 1
    code, out, _ = run_plan(capsys, *TINY, "--device-memory", memory, "--set", f"train.batch_size={largest}")
    assert code == 0 and "fits" in out.splitlines()[-1]
    code, out, _ = run_plan(capsys, *TINY, "--device-memory", memory, "--set", f"train.batch_size={largest + 1}")
    assert code == 1 and "does NOT fit" in out


@pytest.mark.parametrize("args", [("--device-memory", "80 parsecs"), ("--device-memory", "0GB"),
                                  ("--device-memory", "8GiB", "--world-size", "0"),
                                  ("--device-memory", "8GiB", "--set", "dist.zero_stage=4")])
def test_bad_values_exit_2_in_one_line(capsys, args):
    code, out, err = run_plan(capsys, *TINY, *args)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_command_line_bad_size():
    result = subprocess.run([sys.executable, "-m", "hvd_llama.plan", "--device-memory", "lots"], cwd=REPO,
                            env=job_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == ("error: --device-memory 'lots': expected a size such as 80GiB, 80GB, 512MiB "
                                     "or a number of bytes")


@pytest.mark.parametrize("text,expected", [("80GiB", 80 * GiB), ("80GB", 80 * 10**9), ("512MiB", 512 << 20),
                                           ("4096", 4096), ("1.5 GiB", 3 * GiB // 2), ("2gib", 2 * GiB)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_check_fits_names_the_fixes():
    cfg = load_config("configs/llama2-7b.yaml", ["train.batch_size=4", "dist.zero_stage=0",
                                                 "train.activation_checkpointing=false"])
    with pytest.raises(UserError) as err:
        check_fits(cfg, 8, 80 * 10**9)
    message = str(err.value)
    assert "\n" not in message
    for fix in ("dist.zero_stage=3", "train.activation_checkpointing=true", "more ranks"):
        assert fix in message
    fitting = load_config("configs/llama2-7b.yaml", ["dist.zero_stage=2", "train.activation_checkpointing=true",
                                                     "train.batch_size=1"])
    check_fits(fitting, 8, 80 * 10**9)  # no error
    seventy = ["train.batch_size=1", "train.grad_accum=1"]
    with pytest.raises(UserError, match="dist.zero_stage=3"):  # 70B's bf16 weights alone exceed 80 GB at stage 2
        check_fits(load_config("configs/llama2-70b.yaml", [*seventy, "dist.zero_stage=2"]), 64, 80 * 10**9)
    check_fits(load_config("configs/llama2-70b.yaml", [*seventy, "dist.zero_stage=3"]), 32, 79 * 2**30)
    with pytest.raises(UserError, match="even dist.zero_stage=3 with activation checkpointing .* more ranks"):
        check_fits(load_config("configs/llama2-70b.yaml", [*seventy, "dist.zero_stage=3"]), 4, 79 * 2**30)


# The papers' recipes, written from the papers, not the presets (LLaMA, Touvron et al. 2023a, section 2.3 and
# table 2; Llama 2, 2023b, section 2.2 and table 1): AdamW (0.9, 0.95; Llama 2 with eps 1e-5), 2,000 warm-up steps,
# cosine decay to 10% of the peak, weight decay 0.1, clipping 1.0, steps of 4M tokens. Per preset: the peak learning
# rate, the training tokens, the GPU count its comment lays it out for, and whether it fits there on 80 GB GPUs.
RECIPES = {"llama-7b": (3e-4, 1.0e12, 8, True), "llama-13b": (3e-4, 1.0e12, 16, True),
           "llama-33b": (1.5e-4, 1.4e12, 16, True), "llama-65b": (1.5e-4, 1.4e12, 32, True),
           "llama2-7b": (3e-4, 2.0e12, 8, True), "llama2-13b": (3e-4, 2.0e12, 16, True),
           "llama2-70b": (1.5e-4, 2.0e12, 32, True)}
STEP_TOKENS = 4 * 2**20


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_published_presets_train_with_the_papers_recipe_at_their_gpu_count(name):
    lr, tokens, gpus, fits = RECIPES[name]
    path = f"configs/{name}.yaml"
    cfg = load_config(path)
    o, t = cfg.optim, cfg.train
    assert (o.lr, o.min_lr, o.warmup_steps) == pytest.approx((lr, lr / 10, 2000))
    assert (o.beta1, o.beta2, o.eps, o.weight_decay, o.grad_clip) == \
        (0.9, 0.95, 1e-5 if name.startswith("llama2") else OptimConfig.eps, 0.1, 1.0)
    assert t.batch_size * t.seq_len * t.grad_accum * gpus == STEP_TOKENS
    assert (t.max_steps - 1) * STEP_TOKENS < tokens <= t.max_steps * STEP_TOKENS  # the paper's tokens, in whole steps
    comment = " ".join(line.lstrip("# ") for line in (REPO / path).read_text().splitlines() if line.startswith("#"))
    assert f"`python -m hvd_llama.plan --config {path} --world-size {gpus} --device-memory 79GiB`" in comment
    result = plan(cfg, gpus, 79 * GiB)
    assert result.fits == fits
    assert not fits or f"about {result.total / GiB:.0f} GiB per GPU" in comment


# ~100M parameters (97.5M): 12 layers of width 768, vocabulary 8192; two steps of 2 x 256 tokens.
MODEL_100M = ["model.dim=768", "model.n_layers=12", "model.n_heads=12", "model.vocab_size=8192",
              "model.multiple_of=256", "model.max_seq_len=256", "train.seq_len=256", "train.batch_size=2"]


def memory_steps(values: list, np: int) -> list[dict]:
    """Each rank's peak RSS and model state after two steps of tests/memory_step.py."""
    result = run_job([str(REPO / "tests" / "support" / "memory_step.py"), *values], np=np, timeout=900)
    assert result.returncode == 0, result.output[-3000:]
    ranks = [json.loads(line.split(">:", 1)[-1]) for line in result.output.splitlines() if "peak_rss" in line]
    assert len(ranks) == max(np, 1)
    return ranks


@pytest.mark.slow
@pytest.mark.parametrize("np, stage", [(0, 0), (2, 2), (2, 3)])
def test_peak_rss_within_15_percent_of_the_plan(np, stage):
    """fp32: one plain process (np=0) at stage 0, then 2 ranks under horovodrun at ZeRO stages 2 and 3 (each rank
    measures itself)."""
    values = [*MODEL_100M, f"dist.zero_stage={stage}"]
    planned = plan(load_config(None, values), max(np, 1), 24 * GiB, device="cpu").total
    for rank in memory_steps(values, np):
        assert abs(rank["peak_rss"] - planned) / planned < 0.15, (rank["peak_rss"], planned)


@pytest.mark.slow
def test_stage_3_holds_under_30_percent_of_the_model_state_at_4_ranks():
    """Weights, gradients and AdamW's state per rank after real steps, 4 ranks: stage 3 against stage 0."""
    small = ["model.dim=256", "model.n_layers=4", "model.n_heads=4", "model.vocab_size=2048", "model.max_seq_len=64",
             "train.seq_len=64", "train.batch_size=2"]
    stage_0 = max(r["model_state"] for r in memory_steps([*small, "dist.zero_stage=0"], 4))
    stage_3 = max(r["model_state"] for r in memory_steps([*small, "dist.zero_stage=3"], 4))
    assert stage_3 <= 0.30 * stage_0, (stage_3, stage_0)
