import typing

import pytest
import yaml
from support.multiproc import run_job

from hvd_llama.cli import UserError
from hvd_llama.config import Config, load_config, value_of


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


# The spec the fuzz checks against, written independently of config.py's tables: keys where 0 is a valid value
# (usually "off" or "none"), and the keys whose value is one of a few names.
ZERO_ALLOWED = {"optim.min_lr", "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip", "optim.beta1",
                "optim.beta2", "train.seed", "train.eval_every", "train.eval_windows", "train.max_bad_steps",
                "checkpoint.every", "checkpoint.keep", "log.peak_flops", "dist.threads_per_rank", "dist.zero_stage",
                "finetune.lora_rank", "finetune.lora_dropout", "train.loss_chunk", "dist.allreduce_bucket_elements",
                "dist.zero_bucket_elements", "train.stop_grace_s", "dist.zero3_prefetch"}
ENUMS = {"train.precision", "train.device", "dist.compression", "dist.op", "dist.zero_stage", "finetune.lora_targets"}
FREE_TEXT = {"data.dir", "finetune.init_from"}  # paths: checked when used


def all_keys() -> list[tuple[str, type]]:
    """Every config key and its type (Optional[X] as X), from the dataclasses."""
    keys = []
    for section, cls in typing.get_type_hints(Config).items():
        for name, hint in typing.get_type_hints(cls).items():
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            keys.append((f"{section}.{name}", args[0] if args else hint))
    return keys


def fuzz_cases() -> list[tuple[str, str, bool]]:
    """(key, bad or edge value as the command line gives it, whether it must be refused)."""
    cases = []
    for key, kind in all_keys():
        cases.append((key, {str: "[1, 2]", bool: "3"}.get(kind, "abc"), True))  # a wrong type
        if kind in (int, float):
            cases.append((key, "-1", True))
            cases.append((key, "0", key not in ZERO_ALLOWED))
        if key in ENUMS:
            cases.append((key, "7" if kind is int else "bogus", True))
    return cases


def test_every_key_has_a_fuzz_rule():
    keys = {key for key, _ in all_keys()}
    assert ZERO_ALLOWED | ENUMS | FREE_TEXT <= keys  # no stale names
    assert len(fuzz_cases()) > 2 * len(keys)


@pytest.mark.parametrize("key, value, refused", fuzz_cases(), ids=[f"{k}={v}" for k, v, _ in fuzz_cases()])
def test_config_fuzz_one_line_naming_the_key(key, value, refused):
    if not refused:
        assert value_of(load_config(None, [f"{key}={value}"]), key) == 0
        return
    with pytest.raises(UserError) as err:
        load_config(None, [f"{key}={value}"])
    message = str(err.value)
    assert key in message and "\n" not in message


def test_bad_config_stops_every_rank_with_one_line_and_exit_2(tmp_path):
    job = run_job(["-m", "hvd_llama.train", "--run-dir", str(tmp_path / "run"), "--set", "dist.commit_every=0"],
                  np=2, timeout=120)
    assert job.returncode != 0
    for rank in (0, 1):
        # (a rank still exiting when horovodrun stops the job gets its shell's "Terminated" notice: not ours)
        lines = [line for line in job.output.splitlines()
                 if line.startswith(f"[{rank}]<stderr>:") and line != f"[{rank}]<stderr>:Terminated"]
        assert lines == [f"[{rank}]<stderr>:error: dist.commit_every must be > 0, got 0"], job.output[-2000:]
    assert "Exit code: 2" in job.output  # horovodrun names the first rank to exit, with its code
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_adasum_is_refused_at_validation_with_the_reason():
    with pytest.raises(UserError) as err:
        load_config(overrides=["dist.op=adasum"])
    assert "dist.op=adasum is not supported" in str(err.value) and "clipping" in str(err.value)
    assert "\n" not in str(err.value)
    assert load_config(overrides=["dist.op=average"]).dist.op == "average"
    with pytest.raises(UserError, match="dist.op='sum': expected one of average"):
        load_config(overrides=["dist.op=sum"])
