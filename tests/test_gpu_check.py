"""launch/gpu_check.sh, the check of a GPU node: its commands (dry run) and its checks (launch/gpu_check.py, on
fabricated run folders)."""
import contextlib
import importlib.util
import io
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from support import REPO
from support.multiproc import job_env

from hvd_llama.config import load_config


def gpu_check_dry_run(tmp_path, *args, **env):
    return subprocess.run([str(REPO / "launch" / "gpu_check.sh"), "-o", str(tmp_path / "check"), *args],
                          env=dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, **env), capture_output=True,
                          text=True, timeout=60)


def printed_commands(stdout: str) -> list:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_gpu_check_dry_run_prints_every_check_with_valid_settings(tmp_path):
    result = gpu_check_dry_run(tmp_path, GPUS="2", GPU_MEMORY=str(80 << 30))
    assert result.returncode == 0, result.stderr
    commands = printed_commands(result.stdout)
    trains = {c[c.index("--run-dir") + 1].rsplit("/", 1)[1]: c for c in commands if "hvd_llama.train" in c}
    assert list(trains) == ["bf16", "fp16", "compiled", "bf16_again", "bf16_resumed", "1b", "np1_b16", "np2_b8",
                            "np2_b16", "zero0", "zero2", "zero3", "zero3_resumed"]
    for name, command in trains.items():  # every override is one train accepts (the planner's batch aside)
        overrides = [v for k, v in zip(command, command[1:]) if k == "--set" and "<planner" not in v]
        cfg = load_config(str(REPO / "configs" / "small.yaml"), overrides)
        assert cfg.train.device == "cuda", name
    assert "train.compile=true" in trains["compiled"] and "train.precision=fp16" in trains["fp16"]
    assert trains["bf16_resumed"][-2:] == ["--resume", str(tmp_path / "check/runs/bf16/checkpoints/step_00000020")]
    assert trains["np2_b8"][:5] == ["horovodrun", "-np", "2", "-H", "localhost:2"]
    assert "train.batch_size=<planner max batch>" in trains["1b"] and "dist.zero_stage=2" in trains["1b"]
    for stage in (0, 2, 3):
        assert f"dist.zero_stage={stage}" in trains[f"zero{stage}"] and trains[f"zero{stage}"][:3] == ["horovodrun",
                                                                                                     "-np", "2"]
    assert trains["zero3_resumed"][-2:] == ["--resume", str(tmp_path / "check/runs/zero3/checkpoints/step_00000010")]
    doctor = next(c for c in commands if "hvd_llama.doctor" in c)
    assert doctor[:3] == ["horovodrun", "-np", "2"] and "--json" in doctor
    # The planner command runs as printed (on the meta device) and finds a batch for the 1B shape in 80 GiB.
    plan = next(c for c in commands if "hvd_llama.plan" in c)
    planned = subprocess.run(plan, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120)
    assert json.loads(planned.stdout)["max_batch_size"] >= 1, planned.stderr
    assert "dry run: nothing was run" in result.stdout and not (tmp_path / "check").exists()


def test_gpu_check_on_one_gpu_skips_the_two_rank_checks(tmp_path):
    result = gpu_check_dry_run(tmp_path, "-g", "1")
    assert result.returncode == 0 and "skip np2, stages: 1 GPU" in result.stdout
    assert not any("horovodrun" == c[0] and "hvd_llama.train" in c for c in printed_commands(result.stdout))


@pytest.mark.parametrize("args, message", [(["-g", "0"], "no GPU visible"), (["-g", "x"], "-g x: expected"),
                                           (["--bogus"], "unknown argument '--bogus'"), (["-o"], "-o needs a value")])
def test_gpu_check_bad_arguments_are_one_line_exit_2(tmp_path, args, message):
    result = subprocess.run([str(REPO / "launch" / "gpu_check.sh"), *args], env=dict(os.environ, DRY_RUN="1"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def write_run(run_dir, losses, mfu=0.4, memory=True, first_step=1, weights=None):
    run_dir.mkdir(parents=True)
    rows = [{"step": first_step + i, "loss": loss, "mfu": mfu, "tokens_per_s": 1000.0 * (1 + i % 2),
             **({"max_memory_gib": 1.5} if memory else {})} for i, loss in enumerate(losses)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if weights is not None:
        (run_dir / "checkpoints" / "step_00000030").mkdir(parents=True)
        torch.save(weights, run_dir / "checkpoints" / "step_00000030" / "model.pt")


def gpu_check_py(*args):
    """launch/gpu_check.py's main in this process: (exit status, what it printed)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "launch" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = module.main([str(a) for a in args])
    return subprocess.CompletedProcess(args, status, out.getvalue(), "")


def test_gpu_check_run_figures_and_failures(tmp_path):
    write_run(tmp_path / "good", [8.0, 7.0, 6.5] * 5 + [5.0])
    good = gpu_check_py("run", tmp_path / "good")
    assert good.returncode == 0 and "16 steps, loss 8.000 -> 5.000, MFU 40.0%" in good.stdout
    assert "peak 1.50 GiB" in good.stdout
    write_run(tmp_path / "bad", [8.0, 9.0], mfu=1.3, memory=False)
    bad = gpu_check_py("run", tmp_path / "bad")
    assert bad.returncode == 1
    for problem in ("the loss did not go down", "MFU above 100%", "no max_memory_gib logged"):
        assert problem in bad.stdout
    assert gpu_check_py("run", tmp_path / "missing").returncode == 1
    assert gpu_check_py("bogus", tmp_path).returncode == 2


@pytest.mark.parametrize("again_delta, resumed_delta, ok", [(0.0, 0.0, True), (0.0, 1e-6, False),
                                                            (1e-3, 1e-3, True), (1e-4, 1e-2, False)])
def test_gpu_check_resume_compares_with_a_rerun(tmp_path, again_delta, resumed_delta, ok):
    weights = {"w": torch.arange(4.0)}
    losses = [5.0 - 0.1 * i for i in range(10)]
    write_run(tmp_path / "bf16", [8.0] * 20 + losses, weights=weights)
    write_run(tmp_path / "bf16_again", [8.0] * 20 + [x + again_delta for x in losses],
              weights={"w": weights["w"] + again_delta})
    write_run(tmp_path / "bf16_resumed", [x + resumed_delta for x in losses], first_step=21,
              weights={"w": weights["w"] + resumed_delta})
    result = gpu_check_py("resume", tmp_path)
    assert (result.returncode == 0) == ok, result.stdout
    assert ("bit for bit" in result.stdout and "not bit for bit" not in result.stdout) == (resumed_delta == 0)


def test_gpu_check_np2_equivalence_and_scaling(tmp_path):
    write_run(tmp_path / "np1_b16", [8.0, 7.0, 6.0, 5.5, 5.0, 4.8])
    write_run(tmp_path / "np2_b8", [8.0, 7.0, 6.0, 5.5, 5.0, 4.8 * (1 + 1e-6)])
    write_run(tmp_path / "np2_b16", [8.0] * 6)
    result = gpu_check_py("np2", tmp_path)
    assert result.returncode == 0 and "over 6 steps" in result.stdout and "50% scaling efficiency" in result.stdout
    (tmp_path / "np2_b8" / "metrics.jsonl").unlink()
    (tmp_path / "np2_b8").rmdir()
    write_run(tmp_path / "np2_b8", [8.0, 7.1, 6.0, 5.5, 5.0, 4.8])
    assert gpu_check_py("np2", tmp_path).returncode == 1


@pytest.mark.parametrize("stage3_delta, resumed_delta, ok", [(0.01, 0.0, True), (0.03, 0.0, False), (0.0, 1e-2, False)])
def test_gpu_check_stages_against_stage_0_and_the_stage_3_resume(tmp_path, stage3_delta, resumed_delta, ok):
    losses = [8.0 - 0.1 * i for i in range(20)]
    write_run(tmp_path / "zero0", losses)
    write_run(tmp_path / "zero2", [x * 1.005 for x in losses])
    write_run(tmp_path / "zero3", [x * (1 + stage3_delta) for x in losses])
    write_run(tmp_path / "zero3_resumed", [x * (1 + stage3_delta) + resumed_delta for x in losses[10:]], first_step=11)
    result = gpu_check_py("stages", tmp_path)
    assert (result.returncode == 0) == ok, result.stdout
    assert "0.005 at stage 2" in result.stdout
