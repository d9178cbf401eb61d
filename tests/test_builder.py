"""What training builds before its first step: the model in the dtype it trains in, initialised once, on rank 0."""
import json
import subprocess
import sys

import pytest
import torch
from support import REPO
from support.multiproc import job_env

from hvd_llama.config import load_config
from hvd_llama.model import Transformer
from hvd_llama.training import builder
from hvd_llama.training.memory import count_params, plan_at, startup_bytes

TINY = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.vocab_size=64", "model.max_seq_len=16",
        "train.seq_len=8"]


def recorded_draws(monkeypatch) -> list:
    """The dtype of every tensor with storage that nn.init.normal_ fills from now on (meta tensors draw nothing)."""
    draws, normal = [], torch.nn.init.normal_

    def recording(tensor, *args, **kwargs):
        if not tensor.is_meta:
            draws.append(tensor.dtype)
        return normal(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", recording)
    return draws


def test_only_the_initialising_rank_draws_weights(monkeypatch):
    """The other ranks only allocate theirs: the broadcast overwrites every weight."""
    cfg = load_config(None, TINY)
    draws = recorded_draws(monkeypatch)
    for initialise, expected in ((True, {torch.float32}), (False, set())):
        draws.clear()
        model = builder.build_model(cfg, torch.device("cpu"), None, initialise=initialise)
        assert set(draws) == expected
        assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_weights_are_the_fp32_initialisation_rounded_drawn_in_fp32(monkeypatch, tied):
    cfg = load_config(None, TINY + ["train.precision=bf16", "dist.zero_stage=1", f"model.tie_embeddings={tied}"])
    draws = recorded_draws(monkeypatch)
    model = builder.build_model(cfg, torch.device("cpu"), None, initialise=True)
    assert draws and set(draws) == {torch.float32}  # never a draw in bf16: the values would differ
    torch.manual_seed(cfg.train.seed)
    reference = Transformer(cfg.model)  # as one plain process initialises it, in fp32
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, ref.to(torch.bfloat16)), name
    assert (model.output.weight is model.tok_embeddings.weight) == tied


def test_tied_weights_stay_tied_on_every_rank():
    """Ranks > 0 allocate from the meta device; to_empty() unties, which changed their parameter lists."""
    cfg = load_config(None, TINY + ["model.tie_embeddings=true"])
    for initialise in (True, False):
        model = builder.build_model(cfg, torch.device("cpu"), None, initialise=initialise)
        assert model.output.weight is model.tok_embeddings.weight
        assert len(list(model.parameters())) == len(list(Transformer(cfg.model).parameters()))


# Builds a bf16 model whose weights dominate the process, and prints the growth of its peak resident memory.
BUILD = """import json, sys, torch
from hvd_llama.training import builder
from hvd_llama.config import load_config
from hvd_llama.model import Transformer
from hvd_llama.procs import peak_rss
cfg = load_config(None, sys.argv[1:])
with torch.device("meta"):  # torch's one-time cost of its first meta-device model (~75 MB), not the model's
    Transformer(cfg.model)
torch.empty(8).normal_()
before = peak_rss()
model = builder.build_model(cfg, torch.device("cpu"), None, initialise=True)
print(json.dumps({"growth": peak_rss() - before}))
"""


def test_startup_peak_memory_is_the_planners_figure():
    """bf16 weights at stage 1: 2 bytes per parameter and one tensor's fp32 draws, not the 6 bytes per parameter
    of an fp32 model cast afterwards."""
    values = ["model.dim=512", "model.n_layers=8", "model.n_heads=8", "model.vocab_size=32000",
              "model.max_seq_len=64", "train.seq_len=32", "train.precision=bf16", "dist.zero_stage=1"]
    cfg = load_config(None, values)
    counts = count_params(cfg)
    planned = startup_bytes(counts, half=True)
    assert planned == plan_at(cfg, 1, 1 << 40, "cpu", counts).startup
    run = subprocess.run([sys.executable, "-c", BUILD, *values], cwd=REPO, env=job_env(), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    growth = json.loads(run.stdout.splitlines()[-1])["growth"]
    assert 0.9 * counts.total * 2 < growth <= planned * 1.1, (growth, planned, counts.total)
