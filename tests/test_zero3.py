"""ZeRO stage 3 (hvd_llama/parallel/zero3.py): parameter sharding against stage 0 with real processes, and the
training command at stage 3: resume at other world sizes and stages, evaluate and export of its checkpoints."""
import json
from pathlib import Path

import pytest
from multiproc import run_job

pytestmark = pytest.mark.distributed
JOB = Path(__file__).with_name("zero3_job.py")
CASES = ("base", "tied", "lora", "sft")


def job_results(np_: int, launcher: str, tmp_path: Path) -> dict:
    out = tmp_path / "results.json"
    job = run_job([str(JOB), str(out), *CASES], np=np_, launcher=launcher, timeout=300)
    assert job.returncode == 0, job.output[-4000:]
    return {r["case"]: r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("np_, launcher", [(2, "horovodrun"), (3, "horovodrun"), (2, "mpirun"),
                                           pytest.param(3, "mpirun", marks=pytest.mark.slow)])
def test_stage_3_equals_stage_0(np_, launcher, tmp_path):
    """fp32, grad_accum 2, clipping, activation checkpointing, 5 steps; untied and tied embeddings, LoRA over a
    frozen sharded base, and fine-tuning rows whose targets have different lengths. Both stages start from the
    same weights (stage 3's drawn by every rank for its own slices, stage 0's by rank 0 and broadcast)."""
    results = job_results(np_, launcher, tmp_path)
    assert set(results) == set(CASES)
    for case, r in results.items():
        assert r["initial_diff"] == 0.0, case
        assert r["moved"] > 1e-3 and r["final_diff"] < 1e-5, (case, r["final_diff"])
        for zero, three in zip(*r["losses"]):
            assert three == pytest.approx(zero, rel=1e-5), case
        for zero, three in zip(*r["norms"]):
            assert three == pytest.approx(zero, rel=1e-5), case
        if case != "lora":  # clipping (max norm 0.5) was active: the runs would part if it were done wrong
            assert max(r["norms"][0]) > 0.5
        slices_t, slices_f = r["slices"]
        # every rank holds only its slices once a step is over: weights, fp32 gradients, AdamW's two moments
        assert r["state_bytes"] == {"weights": 4 * (slices_t + slices_f), "gradients": 4 * slices_t,
                                    "optimizer": 8 * slices_t}, case
        assert 4 * (slices_t + slices_f) < r["peak_weights"] <= r["planned_weights"], case
        if case == "lora":  # the frozen base is sharded too; only the adapters have gradients
            assert slices_f > 5 * slices_t
