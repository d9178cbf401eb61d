"""ZeRO stage 3 (hvd_llama/parallel/zero3.py): parameter sharding against stage 0 with real processes (the jobs
run tests/support/zero3_job.py), and the training command at stage 3: resume at other world sizes and stages,
evaluate and export of its checkpoints, the sharded --init-from."""
import json
from pathlib import Path

import pytest
import torch
from support import REPO
from support.multiproc import run_job, run_one_process
from support.trainrun import losses, metrics, micro_overrides, stopped_copy, train_job, train_single

from hvd_llama.use.inference import load_model

pytestmark = pytest.mark.distributed
JOB = REPO / "tests" / "support" / "zero3_job.py"
CASES = ("base", "tied", "lora", "sft")


def job_results(np_: int, launcher: str, tmp_path: Path) -> dict:
    out = tmp_path / "results.json"
    job = run_job([str(JOB), str(out), *CASES], np=np_, launcher=launcher, timeout=300)
    assert job.returncode == 0, job.output[-4000:]
    return {r["case"]: r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("np_, launcher", [(2, "horovodrun"), pytest.param(3, "horovodrun", marks=pytest.mark.slow),
                                           pytest.param(2, "mpirun", marks=pytest.mark.slow),
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
        # once a step is over a rank holds only its slices of the weights and of AdamW's two moments
        assert r["state_bytes"] == {"weights": 4 * (slices_t + slices_f), "gradients": 0,
                                    "optimizer": 8 * slices_t}, case
        # during the step: units gathered, the fp32 gradient slice and a unit's whole gradients, as planned
        assert 4 * (slices_t + slices_f) < r["peak"]["weights"] <= r["planned"]["weights"], case
        assert 4 * slices_t <= r["peak"]["gradients"] <= r["planned"]["gradients"], case
        if case == "lora":  # the frozen base is sharded too; only the adapters have gradients
            assert slices_f > 5 * slices_t


@pytest.mark.slow  # six jobs
def test_resume_at_another_world_size_and_stage(small_data, tmp_path):
    """Stage 3 at np=2 (batch 3) for 5 steps, resumed at np=3 (batch 2) for 5 more, equals np=1 with batch 6 for 10
    steps; so does the same stage-3 checkpoint resumed at stage 2, and a stage-2 checkpoint resumed at stage 3."""
    values = {"train.max_steps": 10, "checkpoint.every": 5, "checkpoint.keep": 0}

    def run(run_dir: Path, stage: int, batch: int, np_: int, *more: str) -> None:
        job = train_job(run_dir, micro_overrides(small_data, **values, **{"train.batch_size": batch,
                                                                         "dist.zero_stage": stage}), *more, np=np_)
        assert job.returncode == 0, job.output[-3000:]

    one = tmp_path / "one"
    assert train_single(one, micro_overrides(small_data, **values, **{"train.batch_size": 6})).returncode == 0
    run(tmp_path / "three", 3, 3, 2)
    assert not (tmp_path / "three" / "checkpoints" / "step_00000005" / "model.pt").exists()  # weights in the slices
    run(stopped_copy(tmp_path / "three", tmp_path / "at_three", at_step=5), 3, 2, 3, "--resume", "auto")
    run(stopped_copy(tmp_path / "three", tmp_path / "to_two", at_step=5), 2, 3, 2, "--resume", "auto")
    run(tmp_path / "two", 2, 3, 2)
    run(stopped_copy(tmp_path / "two", tmp_path / "from_two", at_step=5), 3, 2, 3, "--resume", "auto")
    for resumed in ("at_three", "to_two", "from_two"):
        assert losses(tmp_path / resumed) == pytest.approx(losses(one), rel=1e-5), resumed


@pytest.mark.slow
def test_a_stage_3_checkpoint_evaluates_and_exports(small_data, tmp_path):
    """The final val_loss (the whole val split) equals `evaluate` on the checkpoint the run wrote, and its
    `convert export` loads in transformers with the logits of our model."""
    transformers = pytest.importorskip("transformers")
    run_dir = tmp_path / "run"
    job = train_job(run_dir, micro_overrides(small_data, **{"dist.zero_stage": 3, "train.eval_every": 5}))
    assert job.returncode == 0, job.output[-3000:]
    final = metrics(run_dir)[-1]["val_loss"]
    evaluated = run_one_process("hvd_llama.evaluate", "--checkpoint", run_dir, "--json", tmp_path / "eval.json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())["loss_per_token"] == pytest.approx(final, rel=1e-5)
    hf = tmp_path / "hf"
    exported = run_one_process("hvd_llama.convert", "export", "--checkpoint", run_dir, "--out", hf)
    assert exported.returncode == 0, exported.stderr[-3000:]
    model, _, _ = load_model(run_dir)
    tokens = torch.randint(0, 512, (2, 20))
    reference = transformers.LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(reference(tokens).logits, model(tokens), atol=1e-4)
    single = tmp_path / "single"  # the slices as one model.pt, for those who want it
    done = run_one_process("hvd_llama.convert", "consolidate", "--checkpoint", run_dir, "--out", single)
    assert done.returncode == 0, done.stderr[-3000:]
    consolidated = torch.load(single / "model.pt", weights_only=True)
    assert all(torch.equal(consolidated[name], p) for name, p in model.state_dict().items())


@pytest.mark.slow
def test_fp16_overflow_is_skipped_alike_at_stage_3(small_data, tmp_path):
    """A non-finite step on rank 1 at step 2: every rank skips it and halves the loss scale, as at stage 0."""
    runs = {}
    for stage in (0, 3):
        runs[stage] = tmp_path / f"stage{stage}"
        values = {"train.precision": "fp16", "dist.zero_stage": stage}
        job = train_job(runs[stage], micro_overrides(small_data, **values), env={"HVD_LLAMA_FAULT": "nan:2:1"})
        assert job.returncode == 0, job.output[-3000:]
    zero, three = metrics(runs[0]), metrics(runs[3])
    assert [r["skipped"] for r in three] == [r["skipped"] for r in zero] == [False, True, False, False, False]
    assert [r["loss_scale"] for r in three] == [r["loss_scale"] for r in zero]
    assert [r["loss"] for r in three[2:]] == pytest.approx([r["loss"] for r in zero[2:]], rel=1e-5)


@pytest.mark.slow
def test_bf16_weights_at_stage_3_stay_within_2_percent_of_stage_0(small_data, tmp_path):
    values = {"train.precision": "bf16", "train.max_steps": 20}
    runs = {stage: tmp_path / f"stage{stage}" for stage in (0, 3)}
    for stage, run_dir in runs.items():
        job = train_job(run_dir, micro_overrides(small_data, **values, **{"dist.zero_stage": stage}))
        assert job.returncode == 0, job.output[-3000:]
    assert losses(runs[3]) == pytest.approx(losses(runs[0]), rel=0.02)
    assert losses(runs[3])[-1] < losses(runs[3])[0] - 0.1  # it learns


# Under a launcher: build the stage-3 training of a Hugging Face folder's model (`--init-from`: every rank reads
# its pieces, one tensor at a time) and report the growth of the peak resident memory; rank 0 checks the assembled
# slices against the folder's weights read whole.
SHARDED_LOAD = """import json, sys, torch
from hvd_llama import parallel
from hvd_llama.config import load_config
from hvd_llama.model import Transformer
from hvd_llama.training.builder import build_sharded_model
from hvd_llama.procs import peak_rss
from hvd_llama.weights.pretrained import load_weights
hf, values = sys.argv[1], sys.argv[2:]
cfg = load_config(None, values + ["dist.zero_stage=3", f"finetune.init_from={hf}"])
device = parallel.init(cfg.dist, "cpu")
with torch.device("meta"):  # torch's one-time cost of its first meta-device model
    Transformer(cfg.model)
before = peak_rss()
state = load_weights(hf)[0]
model, shards = build_sharded_model(cfg, device, state)
growth = peak_rss() - before
exact = all(torch.equal(own, state[name].reshape(-1)[start:end]) for i, name in enumerate(shards.names)
            for start, end, own in shards.pieces(i))
print("RESULT", json.dumps({"growth": growth, "exact": exact, "slices": sum(s.numel() * 4 for s in shards.shards)}))
"""


@pytest.mark.slow
def test_sharded_init_from_a_hugging_face_folder_reads_one_tensor_at_a_time(tmp_path):
    """Each rank's peak resident memory grows by its slices and one tensor at a time, not by the whole model
    (390 MB), while it reads its pieces of every weight exactly."""
    from safetensors.torch import save_file

    from hvd_llama.model import ModelConfig, Transformer
    from hvd_llama.weights.formats import hf_config, hf_state_dict
    values = ["model.dim=768", "model.n_layers=12", "model.n_heads=12", "model.vocab_size=8192",
              "model.multiple_of=256", "model.max_seq_len=256", "train.seq_len=64"]
    cfg = ModelConfig(dim=768, n_layers=12, n_heads=12, vocab_size=8192, multiple_of=256, max_seq_len=256)
    hf = tmp_path / "hf"
    hf.mkdir()
    model = Transformer(cfg)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    save_file(hf_state_dict(model.state_dict(), cfg), str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(hf_config(cfg, {"bos_token_id": 1, "eos_token_id": 2})))
    del model
    script = tmp_path / "load.py"
    script.write_text(SHARDED_LOAD)
    job = run_job([str(script), str(hf), *values], np=3, timeout=300)
    assert job.returncode == 0, job.output[-3000:]
    for rank in range(3):
        result = json.loads(next(line for line in job.lines(rank) if line.startswith("RESULT")).split(" ", 1)[1])
        assert result["exact"], rank
        # its third of the weights and a tensor at a time (the largest, the embedding: 25 MB); an eager read: > 1x
        assert result["slices"] < result["growth"] < 0.5 * model_bytes, (result, model_bytes)


@pytest.mark.slow  # compilation: ~15 s
def test_compiled_blocks_at_stage_3(small_data, tmp_path):
    """torch.compile per block with the gather and free hooks around each block: the same steps."""
    runs = {compiled: tmp_path / f"compile_{compiled}" for compiled in ("false", "true")}
    for compiled, run_dir in runs.items():
        job = train_job(run_dir, micro_overrides(small_data, **{"dist.zero_stage": 3, "train.compile": compiled}))
        assert job.returncode == 0, job.output[-3000:]
    assert losses(runs["true"]) == pytest.approx(losses(runs["false"]), rel=1e-5)
