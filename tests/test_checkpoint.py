import json
import subprocess
import sys

import pytest
import torch
from support import REPO
from support.multiproc import job_env

from hvd_llama.cli import UserError
from hvd_llama.model import ModelConfig, Transformer
from hvd_llama.training.checkpointing import rng_state, set_rng_state
from hvd_llama.weights import checkpoint

CFG = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=64, max_seq_len=16)


def save(root, step, **kwargs):
    model = Transformer(CFG)
    path = root / "checkpoints" / checkpoint.checkpoint_name(step)
    checkpoint.save_checkpoint(path, model.state_dict(), {"model": vars(CFG)}, step=step, **kwargs)
    return path, model


def test_round_trip_and_manifest(tmp_path):
    path, model = save(tmp_path, 7, train_state={"progress": {"step": 7}})
    manifest = checkpoint.verify_checkpoint(path)
    assert manifest["step"] == 7 and set(manifest["files"]) == {"model.pt", "config.yaml", "train_state.pt"}
    state, cfg, tokenizer = checkpoint.load_model_checkpoint(tmp_path)  # a run dir resolves to its newest
    assert cfg == CFG and tokenizer is None
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert checkpoint.load_train_state(path)["progress"]["step"] == 7


def test_failed_write_leaves_nothing_and_keeps_the_previous(tmp_path, monkeypatch):
    good, _ = save(tmp_path, 1)
    calls = []

    def failing_save(obj, f):
        calls.append(1)
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        save(tmp_path, 2)
    assert calls and [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]  # no temp folder
    assert checkpoint.find_latest_checkpoint(tmp_path) == good


def test_corrupt_or_incomplete_checkpoints_are_skipped(tmp_path):
    first, _ = save(tmp_path, 1)
    second, _ = save(tmp_path, 2)
    model_file = second / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.warns(UserWarning, match="step_00000002 is corrupt"):
        assert checkpoint.find_latest_checkpoint(tmp_path) == first
    (first / "manifest.json").unlink()
    with pytest.raises(UserError, match="not a complete checkpoint"):
        checkpoint.verify_checkpoint(first)
    with pytest.warns(UserWarning), pytest.raises(UserError, match="no complete checkpoint"):
        checkpoint.load_model_checkpoint(tmp_path)


def test_resave_and_prune(tmp_path):
    for step in range(1, 5):
        save(tmp_path, step)
    path, model = save(tmp_path, 4)  # saving the same step again replaces it atomically
    checkpoint.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    state, _, _ = checkpoint.load_model_checkpoint(path)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_weights_are_hashed_while_written_not_read_back(tmp_path, monkeypatch):
    """A 7B checkpoint is tens of GB: its tensors are hashed as they stream to disk, and the manifest still
    matches what a reader computes."""
    read_back = []
    real = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda path: read_back.append(path.name) or real(path))
    path, _ = save(tmp_path, 3, train_state={"progress": {"step": 3}})
    assert read_back == ["config.yaml"]  # small text only
    monkeypatch.undo()
    manifest = checkpoint.verify_checkpoint(path)
    assert all(real(path / name) == digest for name, digest in manifest["files"].items())


def test_slices_written_by_ranks_join_the_checkpoint(tmp_path):
    """Each rank writes its optimizer slice into the staging folder; the manifest covers them all."""
    target = tmp_path / "checkpoints" / checkpoint.checkpoint_name(4)
    staging = checkpoint.begin_checkpoint(target)
    written = {checkpoint.slice_name(r, 2): checkpoint.write_torch(staging / checkpoint.slice_name(r, 2),
                                                                   {"rank": r, "exp_avg": torch.ones(3) * r})
               for r in range(2)}
    checkpoint.save_checkpoint(target, Transformer(CFG).state_dict(), {"model": vars(CFG)}, step=4,
                               staging=staging, written=written)
    assert not staging.exists() and checkpoint.find_latest_checkpoint(tmp_path) == target
    assert [s["rank"] for s in checkpoint.read_optimizer_slices(target)] == [0, 1]
    (target / checkpoint.slice_name(1, 2)).write_bytes(b"torn")
    with pytest.raises(UserError, match="checksum of optimizer.rank00001-of-00002.pt"):
        checkpoint.verify_checkpoint(target)


# One process (Horovod's world of one): bf16 weights at ZeRO stage 1 with every optimizer slice present, then a save,
# printing how much the process's peak resident memory grew during the save.
SAVE = """import ctypes, json, sys, torch
from pathlib import Path
from hvd_llama import parallel
from hvd_llama.training.checkpointing import Checkpointer, Progress
from hvd_llama.config import load_config
from hvd_llama.training.optim import adamw_kwargs, param_groups
from hvd_llama.training.builder import build_model
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
cfg = load_config(None, sys.argv[2:])
device = parallel.init(cfg.dist, "cpu")
model = build_model(cfg, device, None, initialise=True)
opt = parallel.build_data_parallel_optimizer(model, param_groups(model, 0.1), adamw_kwargs(cfg.optim), cfg.dist, stage=1,
                                         grad_accum=1)
opt.reduce_gradients()
opt.step()  # zero gradients: the master slice and the moments now exist, as after any step
ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory goes back: a copy cannot hide in it
open("/proc/self/clear_refs", "w").write("5")  # the peak so far (start-up, the step) is forgotten
before = status("VmRSS:")
Checkpointer(cfg, Path(sys.argv[1]), model, opt, None, parallel).save(Progress(step=1))
print(json.dumps({"growth": status("VmHWM:") - before,
                  "weights": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def test_a_save_copies_neither_the_weights_nor_the_optimizer_slices(tmp_path):
    """bf16 weights at stage 1: a save used to hold an fp32 copy of the whole model (4 bytes per parameter; on a GPU,
    in its memory, which the planner does not count) and a copy of the rank's slices (12 bytes per element)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / checkpoint.TOKENIZER_FILE).write_bytes(b"tokenizer")
    values = ["model.dim=256", "model.n_layers=2", "model.n_heads=8", "model.vocab_size=16000", "model.max_seq_len=64",
              "train.seq_len=32", "train.precision=bf16", "dist.zero_stage=1", f"data.dir={data}"]
    done = subprocess.run([sys.executable, "-c", SAVE, str(tmp_path / "run"), *values], cwd=REPO, env=job_env(),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["growth"] < 0.1 * result["weights"], result
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    saved = checkpoint.read_model_checkpoint(ckpt)[0]
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}  # as the model holds them: nothing lost
    assert len(list(ckpt.glob(checkpoint.SLICE_GLOB))) == 1


# training/checkpointing.py's RNG state on a GPU: the rank's own device, whatever the devices a resume sees.
class FakeCudaRng:
    """torch.cuda's RNG functions for a process that pins `current` among `count` visible devices."""

    def __init__(self, current: int, count: int):
        self.current, self.count, self.states = current, count, {}

    def get_rng_state(self, device="cuda"):
        return torch.tensor([100 + self.index(device)], dtype=torch.uint8)

    def set_rng_state(self, state, device="cuda"):
        self.states[self.index(device)] = int(state[0])

    def index(self, device) -> int:
        index = device if isinstance(device, int) else torch.device(device).index
        index = self.current if index is None else index
        if not 0 <= index < self.count:
            raise IndexError(f"device {index} of {self.count}")
        return index

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        for name in ("get_rng_state", "set_rng_state"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        for name in ("get_rng_state_all", "set_rng_state_all"):  # every device's state: must not be used
            monkeypatch.setattr(torch.cuda, name, lambda *a: pytest.fail(f"torch.cuda.{name} called"))


def test_cuda_rng_state_is_the_ranks_own_device_and_restores_with_fewer_visible(monkeypatch):
    FakeCudaRng(current=3, count=8).install(monkeypatch)  # rank 3 of a node where every rank sees 8 GPUs
    state = rng_state()
    assert int(state["cuda"][0]) == 103
    resumed = FakeCudaRng(current=0, count=1)  # resumed under srun --gpus-per-task=1: one visible GPU
    resumed.install(monkeypatch)
    set_rng_state(state)
    assert resumed.states == {0: 103}


def test_rng_state_without_cuda_in_use_has_no_cuda_part(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    state = rng_state()
    assert state["cuda"] is None
    before = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), before)
