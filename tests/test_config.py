import pytest
import yaml

from hvd_llama.cli import UserError
from hvd_llama.config import Config, load_config


def write(tmp_path, values) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_defaults_validate_and_file_then_command_line_precedence(tmp_path):
    assert load_config() == Config()
    path = write(tmp_path, {"train": {"max_steps": 7, "batch_size": 3}, "optim": {"lr": 0.01}})
    cfg = load_config(path, ["train.max_steps=9", "optim.min_lr=1e-5", "model.n_kv_heads=null"])
    assert (cfg.train.max_steps, cfg.train.batch_size) == (9, 3)  # command line beats the file
    assert cfg.optim.lr == 0.01 and cfg.optim.min_lr == 1e-5
    assert isinstance(cfg.optim.lr, float) and cfg.model.n_kv_heads is None


def test_int_is_accepted_for_float_fields(tmp_path):
    assert load_config(None, ["optim.grad_clip=2"]).optim.grad_clip == 2.0


@pytest.mark.parametrize("overrides, message", [
    (["train.max_stepz=3"], "unknown config key train.max_stepz"),
    (["trian.max_steps=3"], "unknown config section 'trian'"),
    (["train.max_steps=ten"], "train.max_steps: expected int, got 'ten'"),
    (["train.max_steps=1.5"], "train.max_steps: expected int"),
    (["model.dim=100", "model.n_heads=8"], "dim"),
    (["model.n_heads=8", "model.n_kv_heads=3"], "n_kv_heads"),
    (["train.seq_len=512", "model.max_seq_len=256"], "train.seq_len=512 exceeds model.max_seq_len=256"),
    (["train.precision=fp8"], "train.precision='fp8': expected one of fp32, bf16, fp16"),
    (["optim.min_lr=1", "optim.lr=0.1"], "min_lr"),
    (["train.batch_size=0"], "train.batch_size must be > 0"),
    (["train.max_steps"], "expected section.key=value"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))


def test_shipped_presets_load():
    for name in ("tiny", "small"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.train.seq_len <= cfg.model.max_seq_len
