"""Training throughput and MFU of one process: a plain PyTorch loop, hvd_llama's train_step under Horovod
with one rank, and forward + backward alone (timed in a process of its own: train_steps.py)."""
from __future__ import annotations

import statistics

from hvd_llama.bench.common import Bench, flops_per_token, num_params, python_module, read_measurement, table

ROUNDS = 2  # without --rounds


def step_figures(seconds: list[float], tokens_per_step: int, flops_per_token: float, peak_flops: float) -> dict:
    step_s = statistics.median(seconds)
    tokens_per_s = tokens_per_step / step_s
    achieved = flops_per_token * tokens_per_s
    return {"step_s_median": step_s, "tokens_per_s": tokens_per_s, "achieved_flops": achieved,
            "mfu": achieved / peak_flops, "step_s": seconds}


def bench_throughput(b: Bench) -> dict:
    a, rounds = b.args, b.rounds(ROUNDS)
    out = b.work / "throughput.json"
    b.run(python_module("hvd_llama.bench.train_steps", "throughput", *b.config_args(sets=a.set), "--warmup", a.warmup,
                        "--steps", a.steps, "--rounds", rounds, "--threads", b.threads, "--peak-n", a.peak_n,
                        "--json", out), "throughput.log")
    raw = read_measurement(out)
    per_token = flops_per_token(b.cfg)
    variants = {name: step_figures(seconds, b.tokens_per_step, per_token, raw["peak_flops"])
                for name, seconds in raw["step_s"].items()}
    return {"params": num_params(b.cfg), "batch_size": b.cfg.train.batch_size, "seq_len": b.cfg.train.seq_len,
            "tokens_per_step": b.tokens_per_step, "flops_per_token": per_token, "threads": raw["threads"],
            "precision": "fp32", "warmup_steps": a.warmup, "timed_steps": a.steps * rounds,
            "peak_flops": raw["peak_flops"], "peak_matmul_n": raw["peak_matmul_n"], "variants": variants,
            "horovod_vs_reference": variants["horovod"]["tokens_per_s"] / variants["reference"]["tokens_per_s"]}


def show_throughput(r: dict) -> list[str]:
    names = {"reference": "plain PyTorch loop (reference)", "horovod": "hvd_llama train_step, Horovod 1 rank",
             "forward_backward": "forward + backward only"}
    rows = [(names[k], f"{v['step_s_median'] * 1e3:.0f}", f"{v['tokens_per_s']:,.0f}",
             f"{v['achieved_flops'] / 1e9:.1f}", f"{100 * v['mfu']:.1f}%") for k, v in r["variants"].items()]
    return [f"{r['params'] / 1e6:.1f}M parameters, {r['batch_size']} x {r['seq_len']} tokens/step, "
            f"{r['threads']} threads, fp32, median of {r['timed_steps']} steps after warm-up",
            f"measured peak {r['peak_flops'] / 1e9:.1f} GFLOP/s (fp32 matmul {r['peak_matmul_n']}^2), "
            f"{r['flops_per_token'] / 1e6:.1f} MFLOP/token",
            *table(("step", "ms", "tokens/s", "GFLOP/s", "MFU"), rows),
            f"Horovod step / reference step speed: {r['horovod_vs_reference']:.3f}"]

