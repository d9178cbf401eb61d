"""Scaling at np=2, one thread per rank: hvd_llama's train_step under Horovod with each controller (horovodrun
--gloo, and MPI) at each ZeRO stage asked for, torch DDP over Gloo, and the ceiling, each as efficiency against
Horovod at np=1. The ceiling is what the machine allows without any communication: DDP's no_sync steps, its 2
ranks computing side by side in the same processes right after its synchronized steps. Every job runs once per
round, the jobs taking turns, so that a change in the machine's speed hits all alike; then one more Horovod job
per controller writes its timeline next to the report."""
from __future__ import annotations

import statistics
from functools import partial
from pathlib import Path
from typing import Optional

from hvd_llama.bench.common import (
    Bench,
    horovod_rounds,
    job_step_s,
    num_params,
    read_measurement,
    spread,
    summarize_timeline,
    table,
    target_check,
    timeline_line,
    timeline_path,
    torchrun,
)

ROUNDS = 3  # without --rounds
TARGET_VS_DDP = 1.0  # issue 16: Horovod's np=2 efficiency at least DDP's in the same run,
TARGET_VS_CEILING = 0.85  # and at least 85% of the ceiling's
BASELINE = "horovod_np1"  # Horovod at np=1, Gloo, stage 0: the efficiency of every run is against it


def horovod_run(controller: str, stage: int) -> str:
    return f"horovod_np2_{controller}_stage{stage}"


def bench_scaling(b: Bench) -> dict:
    a, rounds, stages = b.args, b.rounds(ROUNDS), sorted(set(b.args.scaling_stages))
    sets = [*a.set, "dist.threads_per_rank=1"] + (["dist.compression=fp16"] if a.fp16_compression else [])
    env = {"OMP_NUM_THREADS": "1"}
    if a.fusion_threshold_mb is not None:
        env["HOROVOD_FUSION_THRESHOLD"] = str(int(a.fusion_threshold_mb * 1024 * 1024))
    if a.cycle_time_ms is not None:
        env["HOROVOD_CYCLE_TIME"] = f"{a.cycle_time_ms:g}"
    bucket = a.fusion_threshold_mb if a.fusion_threshold_mb is not None else 25.0  # DDP's default

    def horovod(np: int, controller: str, stage: int, name: str, options=()) -> list[dict]:
        return b.horovod_ranks(np, name, None, [*sets, f"dist.zero_stage={stage}"], env, a.warmup, a.steps,
                               controller=controller, options=options)

    def ddp(name: str) -> list[dict]:
        folder = b.work / name
        folder.mkdir(parents=True, exist_ok=True)
        b.run(torchrun(2, "hvd_llama.bench.train_steps", "ddp", *b.config_args(sets=sets), "--warmup", a.warmup,
                       "--steps", a.steps, "--bucket-cap-mb", bucket, "--json-dir", folder), f"{name}.log", env)
        return [read_measurement(folder / f"rank{r}.json") for r in range(2)]

    horovod_jobs = {BASELINE: (1, "gloo", 0), **{horovod_run(c, s): (2, c, s) for s in stages for c in a.controllers}}
    launches = {**{run: partial(horovod, *job) for run, job in horovod_jobs.items()}, "ddp_np2": ddp}
    ranks: dict[str, list[list[dict]]] = {run: [] for run in launches}
    for i in range(rounds):
        for run, launch in launches.items():
            ranks[run].append(launch(f"scaling_{run}_round{i}"))
    runs = {run: horovod_figures(ranks[run], controller, stage) for run, (_, controller, stage) in horovod_jobs.items()}
    runs["ddp_np2"], runs["ceiling_np2"] = ddp_figures(ranks["ddp_np2"], bucket)
    add_efficiency(runs, b.tokens_per_step)
    for run in horovod_jobs:
        if run != BASELINE:
            check_targets(runs[run], runs["ddp_np2"], runs["ceiling_np2"])
    for controller in a.controllers:  # after the timed rounds: writing the timeline costs time
        path = timeline_path(Path(a.out), "scaling", controller, f"stage{stages[0]}")
        horovod(2, controller, stages[0], f"scaling_{controller}_timeline", ["--timeline-filename", path])
        runs[horovod_run(controller, stages[0])]["timeline"] = {
            "file": str(path), **summarize_timeline(path, steps=a.warmup + a.steps)}
    return {"params": num_params(b.cfg), "tokens_per_step_per_rank": b.tokens_per_step, "threads_per_rank": 1,
            "fp16_compression": a.fp16_compression, "rounds": rounds, "steps_per_round": a.steps,
            "warmup": a.warmup, "controllers": list(a.controllers), "zero_stages": stages,
            "horovod_env": {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}, "efficiency_baseline": BASELINE,
            "targets": {"vs_ddp": TARGET_VS_DDP, "vs_ceiling": TARGET_VS_CEILING}, "runs": runs}


def horovod_figures(jobs: list[list[dict]], controller: str, stage: int) -> dict:
    np = len(jobs[0])
    # time waiting in reduce_gradients (the allreduces backward did not hide) over step time, per rank over all
    # rounds, averaged over ranks
    share = statistics.mean(sum(sum(job[r]["allreduce_s"]) for job in jobs) / sum(sum(job[r]["step_s"]) for job in jobs)
                            for r in range(np))
    return {"framework": "horovod", "np": np, "controller": controller, "zero_stage": stage, **horovod_rounds(jobs),
            "allreduce_share": share, "ranks_per_round": jobs}


def ddp_figures(jobs: list[list[dict]], bucket_cap_mb: float) -> tuple[dict, dict]:
    """DDP's run, and the ceiling from its no_sync steps (per round the slowest rank's median, as for a step)."""
    step = spread([job_step_s(ranks) for ranks in jobs])
    no_sync = spread([job_step_s(ranks, "no_sync_step_s") for ranks in jobs])
    ddp = {"framework": "ddp", "np": 2, "backend": "gloo", "step_s": step,
           "allreduce_share": 1 - no_sync["median"] / step["median"],  # the step time that goes without the allreduce
           "bucket_cap_mb": bucket_cap_mb, "ranks_per_round": jobs}
    ceiling = {"framework": "none", "np": 2, "source": "ddp_np2's no_sync steps", "step_s": no_sync}
    return ddp, ceiling


def add_efficiency(runs: dict[str, dict], tokens_per_step: int) -> None:
    """Each run's tokens/s (of its median step) and efficiency = tok/s / (np x np=1's tok/s), of the medians and
    within each round (the jobs of a round ran back to back)."""
    def tokens_per_s(np: int, step_s: float) -> float:
        return np * tokens_per_step / step_s

    base = runs[BASELINE]["step_s"]
    for run in runs.values():
        np, step = run["np"], run["step_s"]
        run["tokens_per_s"] = tokens_per_s(np, step["median"])
        run["efficiency"] = run["tokens_per_s"] / (np * tokens_per_s(1, base["median"]))
        run["efficiency_per_round"] = [tokens_per_s(np, s) / (np * tokens_per_s(1, one))
                                       for s, one in zip(step["rounds"], base["rounds"])]


def check_targets(run: dict, ddp: dict, ceiling: dict) -> None:
    """A Horovod np=2 run against issue 16's targets: its efficiency over DDP's and over the ceiling's."""
    for name, other, target in (("vs_ddp", ddp, TARGET_VS_DDP), ("vs_ceiling", ceiling, TARGET_VS_CEILING)):
        per_round = [x / y for x, y in zip(run["efficiency_per_round"], other["efficiency_per_round"])]
        run[name] = target_check(run["efficiency"] / other["efficiency"], per_round, lambda r, t=target: r >= t)
    per_round = [x >= TARGET_VS_DDP and y >= TARGET_VS_CEILING
                 for x, y in zip(run["vs_ddp"]["per_round"], run["vs_ceiling"]["per_round"])]
    run["verdict"] = {"met": run["vs_ddp"]["met"] and run["vs_ceiling"]["met"], "per_round": per_round,
                      "rounds_agree": len(set(per_round)) == 1}


def ratio_cell(check: Optional[dict]) -> str:
    return f"{check['ratio']:.3f} ({min(check['per_round']):.2f}-{max(check['per_round']):.2f})" if check else ""


def show_scaling(r: dict) -> list[str]:
    names = {"horovod": "Horovod (train_step)", "ddp": "torch DDP", "none": "ceiling (DDP no_sync)"}
    rows = []
    for v in r["runs"].values():
        step = v["step_s"]
        rows.append((names[v["framework"]], v["np"], v.get("controller", v.get("backend", "-")),
                     v.get("zero_stage", "-"),
                     f"{step['median'] * 1e3:.0f} [{step['min'] * 1e3:.0f}-{step['max'] * 1e3:.0f}]",
                     f"{v['tokens_per_s']:,.0f}", f"{100 * v['efficiency']:.1f}%", ratio_cell(v.get("vs_ddp")),
                     ratio_cell(v.get("vs_ceiling")),
                     f"{100 * v['allreduce_share']:.1f}%" if "allreduce_share" in v else ""))
    knobs = ", ".join(f"{k}={v}" for k, v in r["horovod_env"].items()) or "no Horovod knobs set"
    lines = [f"{r['params'] / 1e6:.1f}M parameters, {r['tokens_per_step_per_rank']} tokens/step per rank, 1 thread "
             f"per rank, fp16 compression {'on' if r['fp16_compression'] else 'off'}, {knobs}; per round the slowest "
             f"rank's median of {r['steps_per_round']} steps, {r['rounds']} rounds with the jobs taking turns",
             *table(("run", "np", "controller", "stage", "step ms [min-max]", "global tok/s", "efficiency",
                     "vs DDP (rounds)", "vs ceiling (rounds)", "allreduce share"), rows),
             "efficiency = tok/s / (np x Horovod np=1 tok/s), of the median steps; vs DDP, vs ceiling: efficiency "
             "over theirs, of the medians (range over the rounds); allreduce share: Horovod = wait in "
             "reduce_gradients, DDP = 1 - ceiling step / step"]
    for v in r["runs"].values():
        if "timeline" in v:
            lines.append(f"  timeline {v['controller']} stage {v['zero_stage']}: {timeline_line(v['timeline'])}")
    t = r["targets"]
    verdicts = [f"{v['controller']} stage {v['zero_stage']} {'met' if v['verdict']['met'] else 'NOT met'}"
                + ("" if v["verdict"]["rounds_agree"] else " (inconclusive: the rounds disagree)")
                for v in r["runs"].values() if "verdict" in v]
    return [*lines, f"target: Horovod np=2 efficiency >= {t['vs_ddp']:g} x DDP's and >= {t['vs_ceiling']:g} x the "
                    f"ceiling's: {', '.join(verdicts)}"]
