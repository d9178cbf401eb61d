"""ZeRO stage 3 on Horovod side by side with PyTorch FSDP2 on 2 ranks (one thread each): `fully_shard` on every
block and on the root, resharding after forward, over Gloo under torchrun; the same model, initial weights,
batches and steps. The jobs take turns round by round: hvd_llama at stage 3 under each Horovod controller, stage 0
as its baseline, and FSDP2. Figures: each job's step time (the slowest rank's median per round; medians and spread
over rounds, and the ratios of every round), each rank's peak resident memory, and the first steps' losses, which
must agree to 1e-4 (the same arithmetic)."""
from __future__ import annotations

import statistics

from hvd_llama.bench.common import Bench, job_step_s, num_params, ratio_check, read_measurement, spread, table, torchrun

TARGET_VS_FSDP, TARGET_VS_STAGE0, LOSS_RTOL = 1.15, 1.3, 1e-4  # issue 25


def bench_fsdp(b: Bench) -> dict:
    a = b.args
    sets = [*a.set, "dist.threads_per_rank=1"]
    env = {"OMP_NUM_THREADS": "1"}

    def horovod(controller: str, stage: int, name: str) -> list[dict]:
        return b.horovod_ranks(2, name, None, [*sets, f"dist.zero_stage={stage}"], env, a.warmup, a.steps,
                               controller=controller)

    def fsdp(name: str) -> list[dict]:
        folder = b.work / name
        folder.mkdir(parents=True, exist_ok=True)
        b.run(torchrun(2, "hvd_llama.bench.train_steps", "fsdp", *b.config_args(sets=sets), "--warmup", a.warmup,
                       "--steps", a.steps, "--json-dir", folder), f"{name}.log", env)
        return [read_measurement(folder / f"rank{r}.json") for r in range(2)]

    launches = {"fsdp2": fsdp}
    for controller in a.controllers:
        for stage in (3, 0):
            launches[f"hvd_{controller}_stage{stage}"] = lambda name, c=controller, s=stage: horovod(c, s, name)
    jobs: dict[str, list[list[dict]]] = {run: [] for run in launches}
    for i in range(a.stage_rounds):  # the jobs take turns, so that a change in the machine's load hits all alike
        for run, launch in launches.items():
            jobs[run].append(launch(f"fsdp_{run}_round{i}"))
    runs = {run: run_figures(ranks) for run, ranks in jobs.items()}
    return {"params": num_params(b.cfg), "np": 2, "threads_per_rank": 1, "tokens_per_step_per_rank": b.tokens_per_step,
            "rounds": a.stage_rounds, "steps_per_round": a.steps, "warmup": a.warmup, "runs": runs,
            "checks": checks(runs, a.controllers)}


def run_figures(jobs: list[list[dict]]) -> dict:
    """One run's step time over rounds, its ranks' largest peak resident memory (median over rounds), and the
    first round's losses of each rank."""
    return {"step_s": spread([job_step_s(ranks) for ranks in jobs]),
            "peak_rss": statistics.median(max(r["peak_rss"] for r in ranks) for ranks in jobs),
            "losses": [r["losses"] for r in jobs[0]]}


def checks(runs: dict, controllers: list[str]) -> dict:
    """The targets: stage 3's step time against FSDP2's and against stage 0's (per controller), its peak memory
    against FSDP2's, and its losses equal to FSDP2's."""
    fsdp = runs["fsdp2"]
    out = {}
    for controller in controllers:
        three, zero = runs[f"hvd_{controller}_stage3"], runs[f"hvd_{controller}_stage0"]
        out[controller] = {
            "vs_fsdp2": ratio_check(three["step_s"], fsdp["step_s"], TARGET_VS_FSDP),
            "vs_stage0": ratio_check(three["step_s"], zero["step_s"], TARGET_VS_STAGE0),
            "memory_vs_fsdp2": {"ratio": three["peak_rss"] / fsdp["peak_rss"],
                                "met": three["peak_rss"] <= fsdp["peak_rss"]},
            "losses_equal": all(abs(x - y) <= LOSS_RTOL * abs(y) for mine, theirs in zip(three["losses"],
                                                                                         fsdp["losses"])
                                for x, y in zip(mine, theirs))}
    return out


def show_fsdp(r: dict) -> list[str]:
    lines = [f"{r['params'] / 1e6:.1f}M parameters, np=2, 1 thread per rank, {r['tokens_per_step_per_rank']} "
             f"tokens/step per rank; per round the slowest rank's median of {r['steps_per_round']} steps, "
             f"{r['rounds']} rounds interleaved"]
    rows = [(run, f"{v['step_s']['median'] * 1e3:.0f}", f"{v['step_s']['min'] * 1e3:.0f}-{v['step_s']['max'] * 1e3:.0f}",
             f"{v['peak_rss'] / 2**20:.0f}") for run, v in r["runs"].items()]
    lines += table(("run", "step ms", "min-max", "peak RSS MiB"), rows)
    for controller, c in r["checks"].items():
        parts = []
        for name, target in (("vs_fsdp2", TARGET_VS_FSDP), ("vs_stage0", TARGET_VS_STAGE0)):
            check = c[name]
            agree = "" if check["rounds_agree"] else ", inconclusive: the rounds disagree"
            parts.append(f"{name} {check['ratio']:.3f} (target <= {target}: {'met' if check['met'] else 'NOT met'}"
                         f"{agree}; rounds {min(check['per_round']):.3f}-{max(check['per_round']):.3f})")
        memory = c["memory_vs_fsdp2"]
        parts.append(f"peak memory {memory['ratio']:.3f} of FSDP2's ({'met' if memory['met'] else 'NOT met'})")
        parts.append(f"losses {'equal' if c['losses_equal'] else 'DIFFER'} (rtol {LOSS_RTOL})")
        lines.append(f"  stage 3 under {controller}: " + "; ".join(parts))
    return lines
