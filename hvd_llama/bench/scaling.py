"""Scaling: hvd_llama's train_step on 1 and 2 Horovod ranks against torch DDP on 2, one thread per rank."""
from __future__ import annotations

import statistics
from typing import Optional

from hvd_llama.bench.common import Bench, job_step_s, num_params, read_measurement, table, torchrun


def bench_scaling(b: Bench) -> dict:
    a = b.args
    sets = [*a.set, "dist.threads_per_rank=1"] + (["dist.compression=fp16"] if a.fp16_compression else [])
    env = {"OMP_NUM_THREADS": "1"}
    if a.fusion_threshold_mb is not None:
        env["HOROVOD_FUSION_THRESHOLD"] = str(int(a.fusion_threshold_mb * 1024 * 1024))
    if a.cycle_time_ms is not None:
        env["HOROVOD_CYCLE_TIME"] = f"{a.cycle_time_ms:g}"
    bucket = a.fusion_threshold_mb if a.fusion_threshold_mb is not None else 25.0  # DDP's default

    def ddp_ranks(name: str) -> list[dict]:
        folder = b.work / name
        folder.mkdir(parents=True, exist_ok=True)
        b.run(torchrun(2, "hvd_llama.bench.train_steps", "ddp", *b.config_args(sets=sets), "--warmup", a.warmup,
                       "--steps", a.steps, "--bucket-cap-mb", bucket, "--json-dir", folder), f"{name}.log", env)
        return [read_measurement(folder / f"rank{r}.json") for r in range(2)]

    launches = {"horovod_np1": lambda name: b.horovod_ranks(1, name, None, sets, env, a.warmup, a.steps),
                "horovod_np2": lambda name: b.horovod_ranks(2, name, None, sets, env, a.warmup, a.steps),
                "ddp_np2": ddp_ranks}
    ranks: dict[str, list[dict]] = {}
    for i in range(a.rounds):  # the jobs take turns, so that a change in the machine's speed hits all alike
        for run, launch in launches.items():
            ranks[run] = merge_rounds(ranks.get(run), launch(f"scaling_{run}_round{i}"))
    runs = {run: horovod_figures(ranks[run], b.tokens_per_step) for run in ("horovod_np1", "horovod_np2")}
    runs["ddp_np2"] = ddp_figures(ranks["ddp_np2"], b.tokens_per_step, bucket)
    single = runs["horovod_np1"]
    for run in runs.values():
        run["efficiency"] = run["tokens_per_s"] / (run["np"] * single["tokens_per_s"])
    # What the machine allows without any communication: 2 ranks computing side by side (DDP's no_sync steps).
    runs["ddp_np2"]["compute_only_efficiency"] = single["step_s_median"] / runs["ddp_np2"]["no_sync_step_s_median"]
    return {"params": num_params(b.cfg), "tokens_per_step_per_rank": b.tokens_per_step, "threads_per_rank": 1,
            "fp16_compression": a.fp16_compression, "timed_steps": a.steps * a.rounds,
            "horovod_env": {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"},
            "efficiency_baseline": "horovod_np1", "runs": runs}


def merge_rounds(previous: Optional[list[dict]], ranks: list[dict]) -> list[dict]:
    """Each rank's timings of every round so far, in one list per figure."""
    for old, new in zip(previous or [], ranks):
        for key, value in new.items():
            if key.endswith("_s") and isinstance(value, dict):  # per-phase timings
                new[key] = {phase: old[key][phase] + times for phase, times in value.items()}
            elif key.endswith("_s"):
                new[key] = old[key] + value
    return ranks


def horovod_figures(ranks: list[dict], tokens_per_step: int) -> dict:
    np, step_s = len(ranks), job_step_s(ranks)
    return {"framework": "horovod", "np": np, "step_s_median": step_s, "tokens_per_s": np * tokens_per_step / step_s,
            # time waiting in optimizer.synchronize() over step time, averaged over ranks
            "allreduce_share": statistics.mean(sum(r["allreduce_s"]) / sum(r["step_s"]) for r in ranks),
            "ranks": ranks}


def ddp_figures(ranks: list[dict], tokens_per_step: int, bucket_cap_mb: float) -> dict:
    np, step_s, no_sync_s = len(ranks), job_step_s(ranks), job_step_s(ranks, "no_sync_step_s")
    return {"framework": "ddp", "np": np, "step_s_median": step_s, "no_sync_step_s_median": no_sync_s,
            "tokens_per_s": np * tokens_per_step / step_s,
            "allreduce_share": 1 - no_sync_s / step_s,  # the step time that goes when DDP skips the allreduce
            "bucket_cap_mb": bucket_cap_mb, "ranks": ranks}


def show_scaling(r: dict) -> list[str]:
    names = {"horovod": "Horovod (hvd_llama train_step)", "ddp": "torch DDP + Gloo"}
    rows = [(names[v["framework"]], v["np"], f"{v['step_s_median'] * 1e3:.0f}", f"{v['tokens_per_s']:,.0f}",
             f"{100 * v['efficiency']:.1f}%", f"{100 * v['allreduce_share']:.1f}%") for v in r["runs"].values()]
    knobs = ", ".join(f"{k}={v}" for k, v in r["horovod_env"].items()) or "Horovod defaults"
    return [f"{r['params'] / 1e6:.1f}M parameters, {r['tokens_per_step_per_rank']} tokens/step per rank, 1 thread "
            f"per rank, fp16 compression {'on' if r['fp16_compression'] else 'off'}, {knobs}, median of "
            f"{r['timed_steps']} steps",
            *table(("run", "np", "step ms", "global tok/s", "efficiency", "allreduce share"), rows),
            "efficiency = tok/s / (np x Horovod np=1 tok/s); allreduce share: Horovod = wait in "
            "optimizer.synchronize(), DDP = 1 - step(no_sync) / step",
            f"ceiling without communication (2 ranks computing side by side, DDP no_sync): "
            f"{100 * r['runs']['ddp_np2']['compute_only_efficiency']:.1f}% efficiency"]

