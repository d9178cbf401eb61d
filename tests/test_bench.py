"""hvd_llama.bench in smoke settings (a micro model, a few steps, small budgets): the report's schema, and that
its figures agree with each other, with the model and with the time each benchmark took."""
import json
import math
import os
import statistics
from pathlib import Path

import pytest
import torch

from hvd_llama.bench import prepare_steps, stages, train_steps
from hvd_llama.bench.common import horovodrun, summarize_timeline
from hvd_llama.bench.run import main as bench_main
from hvd_llama.config import load_config
from hvd_llama.model import Transformer
from hvd_llama.prep.text import Cleaner
from hvd_llama.training.memory import count_params
from hvd_llama.training.zero_layout import backward_buckets, bucket_size

MICRO = ["--config", "configs/tiny.yaml", "--set", "model.dim=64", "--set", "model.n_layers=2",
         "--set", "model.vocab_size=512", "--set", "train.seq_len=32", "--set", "train.batch_size=4"]
QUALITY_MICRO = ["--vocab-size", "512", "--budget-s", "3", "--quality-set", "model.dim=64",
                 "--quality-set", "model.n_layers=2", "--quality-set", "train.seq_len=64",
                 "--quality-set", "train.batch_size=4"]
TOKENS_PER_STEP = 4 * 32


def run_bench(tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / "results.json"
    bench_main([*argv, "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["memory_bytes"] > 0 and report["machine"]["cpu"]
    assert {"python", "torch", "horovod"} <= set(report["versions"])
    assert report["threads"] >= 1 and report["config"]["model"]["dim"] > 0
    assert not list(tmp_path.glob(".results.json.*")), "the report is written atomically"
    return report


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def close(a: float, b: float) -> bool:
    return a == pytest.approx(b, rel=1e-9)


def test_help_and_user_errors(capsys):
    for main in (bench_main, train_steps.main, prepare_steps.main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0
    assert "throughput" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["quality", "--out", "unused.json"])
    assert exit_info.value.code == 2
    assert "quality needs --text" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["throughput", "--steps", "0"])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_throughput(tmp_path):
    r = run_bench(tmp_path, "throughput", *MICRO, "--warmup", "1", "--steps", "2", "--rounds", "1",
                  "--peak-n", "128")["results"]["throughput"]
    assert r["tokens_per_step"] == TOKENS_PER_STEP and positive(r["peak_flops"]) and positive(r["flops_per_token"])
    assert set(r["variants"]) == {"reference", "horovod", "forward_backward"}
    for v in r["variants"].values():
        assert len(v["step_s"]) == 2 and all(map(positive, v["step_s"]))
        assert close(v["step_s_median"], statistics.median(v["step_s"]))
        assert close(v["tokens_per_s"], TOKENS_PER_STEP / v["step_s_median"])
        assert close(v["achieved_flops"], r["flops_per_token"] * v["tokens_per_s"])
        assert close(v["mfu"], v["achieved_flops"] / r["peak_flops"])
    assert close(r["horovod_vs_reference"],
                 r["variants"]["horovod"]["tokens_per_s"] / r["variants"]["reference"]["tokens_per_s"])
    with torch.device("meta"):
        assert r["flops_per_token"] == Transformer(load_config(MICRO[1], MICRO[3::2]).model).flops_per_token(32)
    # every timed step ran inside the benchmark, as this process timed it (catches a unit or counting slip)
    assert sum(sum(v["step_s"]) for v in r["variants"].values()) < r["wall_s"]


@pytest.mark.slow
@pytest.mark.distributed
def test_scaling(tmp_path):
    warmup, steps, rounds = 1, 1, 1
    # stage 0 only (stage 2's jobs are the same code path, and test_stages times stage 2 against stage 0); one
    # round (test_stages checks the medians and per-round ratios of several)
    r = run_bench(tmp_path, "scaling", *MICRO, "--warmup", str(warmup), "--steps", str(steps), "--rounds", str(rounds),
                  "--scaling-stages", "0", "--fp16-compression", "--fusion-threshold-mb", "8",
                  "--cycle-time-ms", "2")["results"]["scaling"]
    runs = r["runs"]
    horovod_np2 = {f"horovod_np2_{c}_stage0": (c, 0) for c in ("gloo", "mpi")}
    assert set(runs) == {"horovod_np1", "ddp_np2", "ceiling_np2", *horovod_np2}
    assert r["rounds"] == rounds and r["zero_stages"] == [0] and r["controllers"] == ["gloo", "mpi"]
    assert r["horovod_env"] == {"HOROVOD_FUSION_THRESHOLD": str(8 * 1024 * 1024), "HOROVOD_CYCLE_TIME": "2"}
    one = runs["horovod_np1"]
    for name, run in runs.items():
        step = run["step_s"]
        assert len(step["rounds"]) == rounds and step["min"] <= step["median"] <= step["max"]
        assert close(step["median"], statistics.median(step["rounds"]))
        assert close(run["tokens_per_s"], run["np"] * TOKENS_PER_STEP / step["median"])
        assert close(run["efficiency"], run["tokens_per_s"] / (run["np"] * one["tokens_per_s"]))
        assert [pytest.approx(e) for e in run["efficiency_per_round"]] == [  # tok/s over np x np=1's, round by round
            (run["np"] * TOKENS_PER_STEP / s) / (run["np"] * TOKENS_PER_STEP / o)
            for s, o in zip(step["rounds"], one["step_s"]["rounds"])]
    ddp, ceiling = runs["ddp_np2"], runs["ceiling_np2"]
    for name, run in [*((n, runs[n]) for n in ("horovod_np1", *horovod_np2)), ("ddp_np2", ddp)]:
        assert len(run["ranks_per_round"]) == rounds
        for ranks, value, no_sync in zip(run["ranks_per_round"], run["step_s"]["rounds"], ceiling["step_s"]["rounds"]):
            assert len(ranks) == run["np"] and all(rank["threads"] == 1 and len(rank["step_s"]) == steps
                                                    for rank in ranks)
            assert close(value, max(statistics.median(rank["step_s"]) for rank in ranks))
            if name == "ddp_np2":  # the ceiling: the same processes' no_sync steps
                assert close(no_sync, max(statistics.median(rank["no_sync_step_s"]) for rank in ranks))
            else:
                assert all(rank["size"] == run["np"] and rank["zero_stage"] == run["zero_stage"] for rank in ranks)
                for rank in ranks:  # waiting for the allreduce is part of each step
                    assert all(0 <= wait <= step for wait, step in zip(rank["allreduce_s"], rank["step_s"]))
    assert close(ddp["allreduce_share"], 1 - ceiling["step_s"]["median"] / ddp["step_s"]["median"])
    assert one["controller"] == "gloo" and one["zero_stage"] == 0 and "verdict" not in one
    for name, (controller, stage) in horovod_np2.items():
        run = runs[name]
        assert run["controller"] == controller and run["zero_stage"] == stage and 0 <= run["allreduce_share"] < 1
        for key, other, target in (("vs_ddp", ddp, 1.0), ("vs_ceiling", ceiling, 0.85)):
            check = run[key]
            assert close(check["ratio"], run["efficiency"] / other["efficiency"])
            assert [pytest.approx(x) for x in check["per_round"]] == [
                a / b for a, b in zip(run["efficiency_per_round"], other["efficiency_per_round"])]
            assert check["met"] == (check["ratio"] >= target)
        per_round = [x >= 1.0 and y >= 0.85 for x, y in zip(run["vs_ddp"]["per_round"], run["vs_ceiling"]["per_round"])]
        assert run["verdict"] == {"met": run["vs_ddp"]["ratio"] >= 1.0 and run["vs_ceiling"]["ratio"] >= 0.85,
                                  "per_round": per_round, "rounds_agree": len(set(per_round)) == 1}
        # one more job per controller at stage 0 wrote its timeline next to the report
        timeline = run.get("timeline")
        assert (timeline is not None) == (stage == 0)
        if timeline:
            assert timeline["file"] == str(tmp_path / f"results_timeline_scaling_{controller}_stage0.json")
            assert Path(timeline["file"]).is_file() and timeline["steps"] == warmup + steps
            ops = timeline["ops"]
            assert ops["small allreduces (target count, grad norm)"]["ops"] == warmup + steps  # the target count
            # stage 0 allreduces in buckets of dist.allreduce_bucket_elements: the micro model is one, once a step
            assert ops["gradient allreduce"]["ops"] == warmup + steps
    # every timed step ran inside the benchmark, as this process timed it (catches a unit or counting slip)
    assert steps * sum(sum(run["step_s"]["rounds"]) for name, run in runs.items() if name != "ceiling_np2") < r["wall_s"]


@pytest.mark.slow
@pytest.mark.distributed
def test_quality_then_generation_on_its_checkpoint(tmp_path, corpus_path):
    text = tmp_path / "text.txt"
    text.write_text(corpus_path.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    work = tmp_path / "work"
    q = run_bench(tmp_path, "quality", "--text", str(text), *QUALITY_MICRO,
                  "--work-dir", str(work))["results"]["quality"]
    assert q["max_steps"] == max(1, int(3 / q["calibration_step_s"])) and q["steps"] == q["max_steps"]
    assert q["val_chars"] == pytest.approx(20_000, rel=0.01) and q["split_method"] == "characters"
    assert all(positive(q[k]) for k in ("nats_per_char", "bits_per_byte", "perplexity", "train_s"))
    assert q["tokens"] == q["steps"] * 2 * 4 * 64  # steps x 2 ranks x batch 4 x seq_len 64
    assert close(q["nats_per_char"], q["eval"]["loss_sum_nats"] / q["eval"]["characters"])
    # the whole validation split (the last tenth of the cleaned text) is scored: its characters, and its bytes as
    # counted from the scored tokens
    cleaned = Cleaner()(text.read_text(encoding="utf-8"))
    val = cleaned[int(len(cleaned) * 0.9):]
    assert q["eval"]["characters"] == q["val_chars"] == len(val)
    assert q["eval"]["bytes"] == len(val.encode("utf-8"))
    assert close(q["bits_per_byte"], q["nats_per_char"] / math.log(2))

    g = run_bench(tmp_path, "generation", *MICRO, "--new-tokens", "24", "--gen-repeats", "1",
                  "--checkpoint", q["checkpoint"])["results"]["generation"]
    tps = g["tokens_per_s"]
    assert all(map(positive, tps.values()))
    assert close(g["kv_speedup"], tps["fp32_kv_cache"] / tps["fp32_no_kv_cache"])
    assert close(g["int8_speedup"], tps["int8_kv_cache"] / tps["fp32_kv_cache"])
    assert g["kv_speedup_target_met"] == (g["kv_speedup"] >= 5)
    assert generation_seconds(g, repeats=1) < g["wall_s"]
    ppl = g["int8_perplexity"]
    assert close(ppl["fp32"], q["perplexity"])
    assert close(ppl["change"], ppl["int8"] / ppl["fp32"] - 1) and abs(ppl["change"]) < 0.1


def generation_seconds(g: dict, repeats: int) -> float:
    """The least time the generation benchmark can have taken: each decoding runs a warm-up and `repeats` timed
    runs of new_tokens tokens, none faster than the best."""
    return sum(g["new_tokens"] * (repeats + 1) / tps for tps in g["tokens_per_s"].values())


def test_generation_without_checkpoint(tmp_path):
    g = run_bench(tmp_path, "generation", *MICRO, "--new-tokens", "8", "--gen-repeats", "2")["results"]["generation"]
    assert g["max_seq_len"] >= g["prompt_len"] + g["new_tokens"]
    tps = g["tokens_per_s"]
    assert close(g["kv_speedup"], tps["fp32_kv_cache"] / tps["fp32_no_kv_cache"])
    assert close(g["int8_speedup"], tps["int8_kv_cache"] / tps["fp32_kv_cache"])
    assert generation_seconds(g, repeats=2) < g["wall_s"]
    assert "skipped" in g["int8_perplexity"]


@pytest.mark.slow
def test_prepare(tmp_path):
    r = run_bench(tmp_path, "prepare", "--prepare-mb", "1", "--encode-mb", "1")["results"]["prepare"]
    generated = list(r["generated"].values())
    for p in [r["stdlib"], *generated]:
        assert all(positive(p[k]) for k in ("input_bytes", "seconds", "mb_per_s", "peak_rss_bytes", "tokens"))
        assert close(p["mb_per_s"], p["input_bytes"] / 1e6 / p["seconds"])
        assert close(p["mb_per_s_per_core"] * len(os.sched_getaffinity(0)), p["mb_per_s"])
        assert p["prepare_reported_s"] < p["seconds"] < r["wall_s"]  # the process outlasts prepare's own timing
    assert [(p["requested_mb"], p["ranks"]) for p in generated] == [(0.25, 1), (0.25, 2), (1, 1)]
    assert all(p["input_bytes"] == p["corpus_bytes"] >= p["requested_mb"] * 1e6 for p in generated)
    assert close(r["input_growth"], generated[2]["input_bytes"] / generated[0]["input_bytes"])
    assert close(r["peak_rss_growth"], generated[2]["peak_rss_bytes"] / generated[0]["peak_rss_bytes"])
    e = r["encode"]
    assert e["bytes"] >= 1e6 and all(map(positive, e["mb_per_s"].values()))
    assert close(e["parallel_efficiency"], e["mb_per_s"]["encode_parallel"] / (e["mb_per_s"]["sentencepiece_single"]
                                                                                 * e["workers"]))
    assert e["target_met"] == (e["parallel_efficiency"] >= 0.9)
    best_s = [e["bytes"] / 1e6 / speed for speed in e["mb_per_s"].values()]  # each way's fastest of 3 runs
    assert 3 * sum(best_s) < r["wall_s"]
    o = r["open"]
    assert o["shards"] == 10_000 and o["maps_open"] == 64 and 0 < o["open_read_bytes"] < o["bytes"] / 10


# ---- ZeRO stages: memory and step time ----------------------------------------------------------------------
# A micro model with an odd vocabulary (511 rows of the embedding: its tensor sizes are not round numbers).
# One ZeRO bucket, so that the slices are exactly ceil(T / N) elements.
MEMORY_MICRO = ["--memory-config", "configs/tiny.yaml", *(a for s in ("model.dim=64", "model.n_layers=2",
                "model.vocab_size=511", "train.seq_len=32", "train.batch_size=3", "dist.zero_bucket_elements=10000000")
                for a in ("--memory-set", s))]


@pytest.fixture(scope="module")
def memory_report(tmp_path_factory):
    # np=2 only: one process's slices are the whole model (test_zero's single-process run checks that)
    report = run_bench(tmp_path_factory.mktemp("memory"), "memory", *MEMORY_MICRO, "--memory-np", "2")
    return report["results"]["memory"]


@pytest.mark.slow
@pytest.mark.distributed
def test_memory_state_bytes_per_stage_and_world_size(memory_report):
    r = memory_report
    runs, T = r["runs"], r["trainable"]
    assert set(runs) == {f"stage{s}_np2" for s in (0, 1, 2)} | {"bf16_stage0_np2", "bf16_stage2_np2"}
    half = -(-T // 2)  # ceil(T / 2): the np=2 slice, padding included (one bucket)
    for run in runs.values():
        s = run["state_bytes"]
        bf16_weights = run["precision"] == "bf16" and run["stage"] == 2
        assert len(run["ranks"]) == run["np"] and s["weights"] == (2 if bf16_weights else 4) * r["params"]
        assert run["model_state"] == sum(s.values())
        # zero_grad() comes after step(): nothing is freed between the two probes at any stage
        assert run["state_bytes_after_step"] == s
        assert all(rank["peak_rss"] > rank["rss_at_init"] > 0 for rank in run["ranks"])
        assert close(run["peak_rss_vs_plan"], run["peak_rss"] / run["planned_total"] - 1)
    # stage 2 keeps a slice of the gradients and of the AdamW state: exactly half (plus padding) at np=2
    assert runs["stage2_np2"]["state_bytes"]["optimizer"] == 8 * half
    assert runs["stage2_np2"]["state_bytes"]["gradients"] == 4 * half
    stage0 = runs["stage0_np2"]["state_bytes"]["optimizer"]
    assert 8 * T < stage0 < 8 * T + 4 * 1000  # + step counters
    state = [runs[f"stage{s}_np2"]["model_state"] for s in (0, 1, 2)]
    assert state[0] > state[1] > state[2]
    # mixed precision: stage 0 the same 16 bytes per parameter; stage 2 bf16 weights and gradient slice, fp32
    # master weights and moments (ZeRO's 2 + 14/N)
    mixed = [runs[f"bf16_stage{s}_np2"]["state_bytes"] for s in (0, 2)]
    assert mixed[0] == runs["stage0_np2"]["state_bytes"]
    assert mixed[1] == {"weights": 2 * r["params"], "gradients": 2 * half, "optimizer": 12 * half}
    t = r["target"]
    assert close(t["stage2_vs_stage0_model_state_np2"], sum(mixed[1].values()) / sum(mixed[0].values()))
    assert close(t["stage2_vs_stage0_model_state_np2_own_precision"], state[2] / state[0])
    assert t["met"] == (t["stage2_vs_stage0_model_state_np2"] <= 0.6)
    assert close(t["stage2_vs_stage0_peak_rss_np2"], runs["stage2_np2"]["peak_rss"] / runs["stage0_np2"]["peak_rss"])


@pytest.mark.slow
@pytest.mark.distributed
def test_memory_planner_equals_state_bytes_at_every_stage(memory_report):
    for name, run in memory_report["runs"].items():
        planned, measured = run["planned_state_bytes"], run["state_bytes"]
        assert run["state_minus_planned"] == {k: measured[k] - planned[k] for k in planned}
        assert run["planned_model_state"] == sum(planned.values())
        assert measured == planned, name  # every stage: the planner is exact tensor arithmetic


@pytest.mark.slow
@pytest.mark.distributed
def micro_buckets() -> int:
    counts = count_params(load_config(MICRO[1], MICRO[3::2]))
    buckets = len(backward_buckets(counts.numels, bucket_size(counts.trainable)))
    assert buckets >= 4
    return buckets


@pytest.mark.slow
def test_stages_step_time_ratios_and_timelines(tmp_path):
    warmup, steps = 1, 2
    r = run_bench(tmp_path, "stages", *MICRO, "--warmup", str(warmup), "--steps", str(steps), "--stage-rounds", "2",
                  "--controllers", "gloo")["results"]["stages"]
    assert r["np"] == 2 and r["rounds"] == 2 and set(r["controllers"]) == {"gloo"}
    c = r["controllers"]["gloo"]
    for s, v in c["stages"].items():
        step = v["step_s"]
        assert len(step["rounds"]) == 2 and step["min"] <= step["median"] <= step["max"]
        assert close(step["median"], statistics.median(step["rounds"]))
        for ranks, value in zip(v["ranks_per_round"], step["rounds"]):
            assert all(rank["zero_stage"] == int(s) and len(rank["step_s"]) == steps for rank in ranks)
            assert close(value, max(statistics.median(rank["step_s"]) for rank in ranks))
            for rank in ranks:  # the optimizer's calls are part of the step
                assert all(sum(p[i] for p in rank["phase_s"].values()) <= rank["step_s"][i] for i in range(steps))
        ops = v["timeline"]["ops"]
        assert Path(v["timeline"]["file"]).is_file() and v["timeline"]["steps"] == warmup + steps
        # one target count per step, a grad norm per step at stages 1-2; the micro model is one bucket
        assert ops["small allreduces (target count, grad norm)"]["ops"] == (warmup + steps) * (1 if s == "0" else 2)
        if s == "0":
            assert "gradient allreduce" in ops and "gradient reduction into slices" not in ops
        else:
            # one reduction and one all-gather per bucket and step (the default size: at least 4 buckets), those
            # Horovod ran in one cycle fused into one op
            for kind in ("gradient reduction into slices", "weight all-gather"):
                assert warmup + steps <= ops[kind]["ops"] <= (warmup + steps) * micro_buckets()
            assert "gradient allreduce" not in ops
    for s in ("1", "2"):
        ratio = c["ratios"][f"stage{s}_vs_stage0"]
        assert close(ratio["ratio"], c["stages"][s]["step_s"]["median"] / c["stages"]["0"]["step_s"]["median"])
        assert ratio["met"] == (ratio["ratio"] <= 1.05)
        assert ratio["rounds_agree"] == (len({x <= 1.05 for x in ratio["per_round"]}) == 1)
        assert [pytest.approx(x) for x in ratio["per_round"]] == [
            a / b for a, b in zip(c["stages"][s]["step_s"]["rounds"], c["stages"]["0"]["step_s"]["rounds"])]
    assert 3 * 2 * steps * min(c["stages"][s]["step_s"]["min"] for s in "012") < r["wall_s"]


@pytest.mark.slow  # five jobs
def test_fsdp2_side_by_side_with_stage_3(tmp_path):
    """hvd_llama at stage 3 (and 0) and PyTorch FSDP2 on the same model, initial weights and batches: the first
    steps' losses agree to 1e-4 on every rank; the ratios are those of the medians, the verdicts those targets."""
    r = run_bench(tmp_path, "fsdp", *MICRO, "--warmup", "1", "--steps", "2", "--stage-rounds", "1",
                  "--controllers", "gloo")["results"]["fsdp"]
    assert set(r["runs"]) == {"fsdp2", "hvd_gloo_stage3", "hvd_gloo_stage0"}
    fsdp, three = r["runs"]["fsdp2"], r["runs"]["hvd_gloo_stage3"]
    for mine, theirs in zip(three["losses"], fsdp["losses"]):  # per rank: warm-up and timed steps
        assert len(mine) == 3 and mine == pytest.approx(theirs, rel=1e-4)
    assert three["losses"][0] != pytest.approx(three["losses"][1], rel=1e-4)  # the ranks had their own batches
    c = r["checks"]["gloo"]
    assert c["losses_equal"]
    assert close(c["vs_fsdp2"]["ratio"], three["step_s"]["median"] / fsdp["step_s"]["median"])
    assert c["vs_fsdp2"]["met"] == (c["vs_fsdp2"]["ratio"] <= 1.15)
    assert c["memory_vs_fsdp2"]["met"] == (three["peak_rss"] <= fsdp["peak_rss"]) and fsdp["peak_rss"] > 100 << 20


def test_timeline_summary_merges_fused_ops_and_reads_an_unclosed_file(tmp_path):
    """Horovod's trace: one pid per tensor; a fused allreduce shows on each of its tensors but runs once."""
    def op(pid, name, start, end, nested=None):
        inner = [{"ph": "B", "name": nested, "ts": start + 1, "pid": pid}, {"ph": "E", "ts": end - 1, "pid": pid}]
        return [{"ph": "B", "name": name, "ts": start, "pid": pid}, *(inner if nested else []),
                {"ph": "E", "ts": end, "pid": pid}]
    names = {1: "allreduce.wq", 2: "allreduce.wk", 3: "allreduce.step.targets", 4: "broadcast.wq",
             5: "allreduce.zero.grad.0", 6: "reducescatter.zero.grad.1"}
    events = [{"name": "process_name", "ph": "M", "pid": p, "args": {"name": n}} for p, n in names.items()]
    events += op(3, "NEGOTIATE_ALLREDUCE", 0, 50_000) + op(3, "ALLREDUCE", 50_000, 51_000)
    events += op(4, "BROADCAST", 0, 9_000)
    events += op(1, "ALLREDUCE", 100_000, 104_000, "GLOO_ALLREDUCE") + op(2, "ALLREDUCE", 100_000, 104_000)
    events += op(1, "ALLREDUCE", 200_000, 202_000) + op(2, "ALLREDUCE", 201_000, 206_000)
    # ZeRO's gradient buckets: under Gloo allreduced (the slice kept), under MPI reduce-scattered
    events += op(5, "ALLREDUCE", 300_000, 303_000) + op(6, "REDUCESCATTER", 400_000, 402_000)
    path = tmp_path / "timeline.json"
    path.write_text("[\n" + ",\n".join(json.dumps(e) for e in events) + ",")  # as a job killed mid-run leaves it
    summary = summarize_timeline(path, steps=2)
    assert summary == {"steps": 2, "ops": {
        "gradient allreduce": {"ops": 2, "op_ms_median": 5.0, "op_ms_max": 6.0, "busy_ms_per_step": 5.0},
        "gradient reduction into slices": {"ops": 2, "op_ms_median": 2.5, "op_ms_max": 3.0, "busy_ms_per_step": 2.5},
        "small allreduces (target count, grad norm)": {"ops": 1, "op_ms_median": 1.0, "op_ms_max": 1.0,
                                                        "busy_ms_per_step": 0.5}}}


def test_stage_ratios_are_the_medians_ratio():
    def job(step_s):  # two ranks; the job's figure is the slowest rank's median
        return [{"step_s": [step_s, step_s + 1, 9 * step_s], "phase_s": {p: [0.0] * 3 for p in train_steps.PHASES}},
                {"step_s": [step_s / 2] * 3, "phase_s": {p: [0.0] * 3 for p in train_steps.PHASES}}]
    c = stages.controller_figures({0: [job(2.0), job(4.0), job(3.0)], 1: [job(3.0), job(3.0), job(6.0)],
                                   2: [job(2.0), job(8.0), job(3.0)]})
    assert c["stages"]["0"]["step_s"] == {"median": 4.0, "min": 3.0, "max": 5.0, "rounds": [3.0, 5.0, 4.0]}
    assert c["ratios"]["stage1_vs_stage0"] == {"ratio": 1.0, "met": True, "rounds_agree": False,
                                               "per_round": [4 / 3, 4 / 5, 7 / 4]}
    assert c["ratios"]["stage2_vs_stage0"]["ratio"] == 4 / 4 and c["ratios"]["stage2_vs_stage0"]["per_round"] == [
        1.0, 9 / 5, 1.0]
    agreeing = stages.controller_figures({0: [job(4.0)] * 3, 1: [job(2.0), job(3.0), job(4.0)], 2: [job(9.0)] * 3})
    assert agreeing["ratios"]["stage1_vs_stage0"]["rounds_agree"] and agreeing["ratios"]["stage1_vs_stage0"]["met"]
    assert agreeing["ratios"]["stage2_vs_stage0"]["rounds_agree"] and not agreeing["ratios"]["stage2_vs_stage0"]["met"]


def test_controllers_and_memory_options(capsys):
    assert "--gloo" in horovodrun(2, ["python"]) and "--gloo" not in horovodrun(2, ["python"], controller="mpi")
    assert horovodrun(2, ["python"], options=["--timeline-filename", "t.json"])[-3:] == [
        "--timeline-filename", "t.json", "python"]
    for args, message in ((["--memory-steps", "1"], "--memory-steps must be >= 2"),
                          (["--memory-np", "0", "2"], "--memory-np must be > 0"),
                          (["--controllers", "nccl"], "invalid choice"),
                          (["--scaling-stages", "3"], "invalid choice"),
                          (["--rounds", "0"], "--rounds must be > 0")):
        with pytest.raises(SystemExit) as exit_info:
            bench_main(["memory", *args, "--out", "unused.json"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
