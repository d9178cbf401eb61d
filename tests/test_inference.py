"""hvd_llama/use/inference.py's weight types: bf16 weights in evaluate and generate, int8 excluded."""
import json

import pytest
import torch
from support.multiproc import run_one_process

from hvd_llama.cli import UserError
from hvd_llama.use.inference import check_dtype, load_model


def one_process_json(module, tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    result = run_one_process(module, *args, "--json", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result


@pytest.mark.slow  # bf16 matmuls run at ~1 GFLOP/s on this CPU
def test_bf16_evaluate_is_within_two_percent_of_fp32(micro_run, tmp_path):
    fp32, _ = one_process_json("hvd_llama.evaluate", tmp_path, "fp32", "--checkpoint", micro_run, "--threads", 1)
    bf16, run = one_process_json("hvd_llama.evaluate", tmp_path, "bf16", "--checkpoint", micro_run, "--threads", 1,
                                 "--dtype", "bf16")
    assert bf16["dtype"] == "bf16" and fp32["dtype"] == "fp32" and bf16["tokens"] == fp32["tokens"]
    assert bf16["loss_per_token"] == pytest.approx(fp32["loss_per_token"], rel=0.02)
    assert bf16["loss_sum_nats"] != fp32["loss_sum_nats"]  # the bf16 weights really ran
    assert "fp32, bf16 weights" in run.stdout


def test_bf16_generate_runs_and_returns_text(micro_run):
    result = run_one_process("hvd_llama.generate", "--checkpoint", micro_run, "--prompt", "def main(",
                             "--max-new-tokens", 12, "--temperature", 0, "--dtype", "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("def main(") and len(result.stdout) > len("def main(\n")
    assert "| bf16 | cpu" in result.stderr and "generated 12 tokens" in result.stderr


def test_bf16_weights_are_bf16_and_exclude_int8(micro_run):
    model, _, _ = load_model(micro_run, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.float32  # logits stay fp32 for sampling and the loss
    with pytest.raises(UserError, match="--dtype bf16 and --quantize int8"):
        check_dtype("bf16", "int8")
