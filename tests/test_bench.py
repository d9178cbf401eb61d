"""hvd_llama.bench in smoke settings (a micro model, a few steps, small budgets): the report's schema, and that
its figures agree with each other, with the model and with the time each benchmark took."""
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from hvd_llama.bench import prepare_steps, train_steps
from hvd_llama.bench.run import main as bench_main
from hvd_llama.config import load_config
from hvd_llama.model import Transformer

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
    r = run_bench(tmp_path, "scaling", *MICRO, "--warmup", "1", "--steps", "1", "--rounds", "2", "--fp16-compression",
                  "--fusion-threshold-mb", "8", "--cycle-time-ms", "2")["results"]["scaling"]
    runs = r["runs"]
    assert set(runs) == {"horovod_np1", "horovod_np2", "ddp_np2"}
    assert r["horovod_env"] == {"HOROVOD_FUSION_THRESHOLD": str(8 * 1024 * 1024), "HOROVOD_CYCLE_TIME": "2"}
    single = runs["horovod_np1"]["tokens_per_s"]
    for run in runs.values():
        assert len(run["ranks"]) == run["np"] and all(rank["threads"] == 1 for rank in run["ranks"])
        assert all(len(rank["step_s"]) == 2 for rank in run["ranks"]), "both rounds' steps are kept"
        assert close(run["tokens_per_s"], run["np"] * TOKENS_PER_STEP / run["step_s_median"])
        assert close(run["efficiency"], run["tokens_per_s"] / (run["np"] * single))
        assert positive(run["tokens_per_s"]) and run["allreduce_share"] < 1
        assert all(sum(rank["step_s"]) < r["wall_s"] for rank in run["ranks"])
    for rank in runs["horovod_np2"]["ranks"]:  # waiting for the allreduce is part of each step
        assert all(0 <= wait <= step for wait, step in zip(rank["allreduce_s"], rank["step_s"]))
    assert 0 <= runs["horovod_np2"]["allreduce_share"]
    ddp = runs["ddp_np2"]
    assert close(ddp["allreduce_share"], 1 - ddp["no_sync_step_s_median"] / ddp["step_s_median"])
    assert close(ddp["compute_only_efficiency"], runs["horovod_np1"]["step_s_median"] / ddp["no_sync_step_s_median"])


@pytest.mark.slow
@pytest.mark.distributed
def test_quality_then_generation_on_its_checkpoint(tmp_path, shakespeare_path):
    text = tmp_path / "text.txt"
    text.write_text(shakespeare_path.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    work = tmp_path / "work"
    q = run_bench(tmp_path, "quality", "--text", str(text), *QUALITY_MICRO,
                  "--work-dir", str(work))["results"]["quality"]
    assert q["max_steps"] == max(1, int(3 / q["calibration_step_s"])) and q["steps"] == q["max_steps"]
    assert q["val_chars"] == pytest.approx(20_000, rel=0.01) and q["split_method"] == "characters"
    assert all(positive(q[k]) for k in ("nats_per_char", "bits_per_byte", "perplexity", "train_s"))
    assert q["tokens"] == q["steps"] * 2 * 4 * 64  # steps x 2 ranks x batch 4 x seq_len 64
    assert close(q["nats_per_char"], q["eval"]["loss_sum_nats"] / q["eval"]["characters"])
    # tiny Shakespeare is ASCII: the bytes counted from the scored tokens are the validation characters
    assert q["eval"]["bytes"] == q["eval"]["characters"] == q["val_chars"]
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


def test_prepare(tmp_path):
    r = run_bench(tmp_path, "prepare", "--prepare-mb", "1", "--encode-mb", "1")["results"]["prepare"]
    for p in (r["stdlib"], r["generated"]):
        assert all(positive(p[k]) for k in ("input_bytes", "seconds", "mb_per_s", "peak_rss_bytes", "tokens"))
        assert close(p["mb_per_s"], p["input_bytes"] / 1e6 / p["seconds"])
        assert p["prepare_reported_s"] < p["seconds"] < r["wall_s"]  # the process outlasts prepare's own timing
    assert r["generated"]["corpus_bytes"] >= 1e6 and r["generated"]["input_bytes"] == r["generated"]["corpus_bytes"]
    e = r["encode"]
    assert e["bytes"] >= 1e6 and all(map(positive, e["mb_per_s"].values()))
    assert close(e["parallel_efficiency"], e["mb_per_s"]["encode_parallel"] / (e["mb_per_s"]["sentencepiece_single"]
                                                                                 * e["workers"]))
    assert e["target_met"] == (e["parallel_efficiency"] >= 0.9)
    best_s = [e["bytes"] / 1e6 / speed for speed in e["mb_per_s"].values()]  # each way's fastest of 3 runs
    assert 3 * sum(best_s) < r["wall_s"]
