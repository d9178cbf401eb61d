"""Step time of ZeRO stages 1 and 2 against stage 0 on 2 ranks (one thread each). In theory the same traffic: a
reduce-scatter plus an all-gather move what one allreduce does. The three jobs take turns round by round under
each controller (horovodrun --gloo, and MPI); then one more job per stage writes Horovod's timeline (next to
the report), whose op times say where a gap comes from."""
from __future__ import annotations

from pathlib import Path

from hvd_llama.bench.common import (
    PHASES,
    Bench,
    horovod_rounds,
    num_params,
    ratio_check,
    summarize_timeline,
    table,
    timeline_line,
    timeline_path,
)

STAGES = (0, 1, 2)
TARGET_RATIO = 1.05  # issue 15: stages 1 and 2 at most 5% slower than stage 0


def bench_stages(b: Bench) -> dict:
    a = b.args
    sets = [*a.set, "dist.threads_per_rank=1"]
    env = {"OMP_NUM_THREADS": "1"}

    def job(controller: str, stage: int, name: str, options=()) -> list[dict]:
        return b.horovod_ranks(2, name, None, [*sets, f"dist.zero_stage={stage}"], env, a.warmup, a.steps,
                               controller=controller, options=options)

    rounds = {c: {s: [] for s in STAGES} for c in a.controllers}
    for i in range(a.stage_rounds):  # the jobs take turns, so that a change in the machine's load hits all alike
        for controller in a.controllers:
            for stage in STAGES:
                rounds[controller][stage].append(job(controller, stage, f"stages_{controller}_stage{stage}_round{i}"))
    controllers = {c: controller_figures(rounds[c]) for c in a.controllers}
    for controller in a.controllers:  # the timelines: one job per stage after the timed rounds (it costs time)
        for stage in STAGES:
            path = timeline_path(Path(a.out), controller, f"stage{stage}")
            job(controller, stage, f"stages_{controller}_stage{stage}_timeline", ["--timeline-filename", path])
            summary = summarize_timeline(path, steps=a.warmup + a.steps)
            controllers[controller]["stages"][str(stage)]["timeline"] = {"file": str(path), **summary}
    return {"params": num_params(b.cfg), "np": 2, "threads_per_rank": 1, "tokens_per_step_per_rank": b.tokens_per_step,
            "rounds": a.stage_rounds, "steps_per_round": a.steps, "warmup": a.warmup, "target_ratio": TARGET_RATIO,
            "controllers": controllers}


def controller_figures(rounds: dict[int, list[list[dict]]]) -> dict:
    """Per stage: the step time's median and spread over rounds; its ratio to stage 0 (median over median) and
    the ratio within each round (the jobs of a round ran back to back)."""
    stages = {str(s): {**horovod_rounds(jobs), "ranks_per_round": jobs} for s, jobs in rounds.items()}
    base = stages["0"]["step_s"]
    ratios = {}
    for s in STAGES[1:]:
        ratios[f"stage{s}_vs_stage0"] = ratio_check(stages[str(s)]["step_s"], base, TARGET_RATIO)
    return {"stages": stages, "ratios": ratios}


def show_stages(r: dict) -> list[str]:
    lines = [f"{r['params'] / 1e6:.1f}M parameters, np=2, 1 thread per rank, {r['tokens_per_step_per_rank']} "
             f"tokens/step per rank; per round the slowest rank's median of {r['steps_per_round']} steps, "
             f"{r['rounds']} rounds interleaved"]
    for controller, c in r["controllers"].items():
        rows = []
        for s, v in c["stages"].items():
            step, ph = v["step_s"], v["phase_s_median"]
            ratio = c["ratios"].get(f"stage{s}_vs_stage0")
            rows.append((f"{controller} stage {s}", f"{step['median'] * 1e3:.0f}",
                         f"{step['min'] * 1e3:.0f}-{step['max'] * 1e3:.0f}",
                         f"{ratio['ratio']:.3f}" if ratio else "1",
                         f"{min(ratio['per_round']):.3f}-{max(ratio['per_round']):.3f}" if ratio else "",
                         *(f"{ph[p] * 1e3:.0f}" for p in PHASES)))
        lines += table(("run", "step ms", "min-max", "vs stage 0", "per round", "reduce ms", "clip ms",
                        "opt.step ms"), rows)
        for s, v in c["stages"].items():
            if "timeline" in v:
                lines.append(f"  timeline {controller} stage {s}: {timeline_line(v['timeline'])}")
        verdicts = [f"{k.split('_')[0]} {'met' if v['met'] else 'NOT met'}"
                    + ("" if v["rounds_agree"] else " (inconclusive: the rounds disagree)") for k, v in c["ratios"].items()]
        lines.append(f"  target <= {r['target_ratio']:.2f}x stage 0 ({controller}): {', '.join(verdicts)}")
    return lines
