import pytest
import torch

from hvd_llama import checkpoint
from hvd_llama.cli import UserError
from hvd_llama.model import ModelConfig, Transformer

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
