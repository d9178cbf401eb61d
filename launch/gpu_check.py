"""The checks of launch/gpu_check.sh on what its commands wrote: `python launch/gpu_check.py CHECK ARGS...` prints one
report line and exits 0, or prints it and exits 1 naming what failed (2 on a bad CHECK).

    doctor DOCTOR_JSON      every collective of CUDA tensors served by NCCL
    run RUN_DIR             a training run: loss down, MFU <= 100%, peak memory logged (figures after step 10)
    resume RUNS_DIR         bf16_resumed (from step 20) vs bf16, with bf16_again telling GPU non-determinism apart
    np2 RUNS_DIR            np2_b8 = np1_b16 step by step; tokens/s of np2_b16 against np1_b16
    stages RUNS_DIR         zero2 and zero3 (bf16) within 2% of zero0 step by step; zero3_resumed = zero3 after step 10
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path


def records(run_dir) -> list:
    return [r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def doctor(path) -> tuple[str, list]:
    report = json.loads(Path(path).read_text())
    cuda = report["horovod"]["backends"]["cuda"]
    slow = [f"{op}={backend}" for op, backend in cuda.items() if backend != "NCCL"]
    bandwidth = report.get("bandwidth") or report.get("bandwidth_note")
    return (f"{len(report['gpus'])} GPU(s); CUDA collectives {cuda}; bandwidth {bandwidth}",
            ["not NCCL: " + ", ".join(slow)] if slow else [])


def run(run_dir) -> tuple[str, list]:
    rows = records(run_dir)
    steady = [r for r in rows if r["step"] > 10] or rows  # compilation and warm-up excluded
    losses = [r["loss"] for r in rows]
    mfu = statistics.median(r["mfu"] for r in steady)
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady)
    peak = max(r.get("max_memory_gib", math.nan) for r in rows)
    line = (f"{len(rows)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, MFU {100 * mfu:.1f}%, "
            f"{tokens_per_s:,.0f} tok/s, peak {peak:.2f} GiB allocated")
    problems = [problem for problem, bad in (("non-finite loss", not all(map(math.isfinite, losses))),
                                             ("the loss did not go down", not losses[-1] < losses[0]),
                                             ("MFU above 100%: the peak is understated", mfu > 1),
                                             ("no max_memory_gib logged", math.isnan(peak))) if bad]
    return line, problems


def _after_20(runs: Path, name: str):
    import torch
    weights = torch.load(runs / name / "checkpoints" / "step_00000030" / "model.pt", map_location="cpu",
                         weights_only=True)
    return [r["loss"] for r in records(runs / name) if r["step"] > 20], weights


def _gap(a, b) -> float:
    if len(a[0]) != len(b[0]) or a[1].keys() != b[1].keys():
        return math.inf
    losses = max((abs(x - y) for x, y in zip(a[0], b[0])), default=0.0)
    return max([losses] + [(a[1][k].double() - b[1][k].double()).abs().max().item() for k in a[1]])


def resume(runs_dir) -> tuple[str, list]:
    runs = Path(runs_dir)
    first, again, resumed = (_after_20(runs, name) for name in ("bf16", "bf16_again", "bf16_resumed"))
    noise, gap = _gap(first, again), _gap(first, resumed)
    line = (f"resumed vs uninterrupted, steps 21-30 and final weights: max difference {gap:.3g} "
            f"({'bit for bit' if gap == 0 else 'not bit for bit'}); a rerun differs by {noise:.3g} "
            f"({'deterministic' if noise == 0 else 'non-deterministic kernels'})")
    return line, ["the resumed run differs more than a rerun does"] if gap > 10 * noise else []


def np2(runs_dir) -> tuple[str, list]:
    runs = Path(runs_dir)
    one, two = ([r["loss"] for r in records(runs / name)] for name in ("np1_b16", "np2_b8"))
    gap = max((abs(a - b) / abs(a) for a, b in zip(one, two)), default=math.inf)
    tps = {name: statistics.median(r["tokens_per_s"] for r in records(runs / name)[3:])
           for name in ("np1_b16", "np2_b16")}
    line = (f"2 ranks x 8 vs 1 rank x 16: max relative loss difference {gap:.2g} over {len(one)} steps; "
            f"{tps['np2_b16']:,.0f} tok/s on 2 GPUs vs {tps['np1_b16']:,.0f} on 1 = "
            f"{100 * tps['np2_b16'] / (2 * tps['np1_b16']):.0f}% scaling efficiency")
    return line, [f"2 ranks differ from 1 (relative {gap:.2g} > 1e-4)"] if gap > 1e-4 or len(one) != len(two) else []


def _relative_gap(a: list, b: list) -> float:
    return max((abs(x - y) / abs(y) for x, y in zip(a, b)), default=math.inf) if len(a) == len(b) else math.inf


def stages(runs_dir) -> tuple[str, list]:
    runs = Path(runs_dir)
    rows = {name: records(runs / name) for name in ("zero0", "zero2", "zero3", "zero3_resumed")}
    losses = {name: [r["loss"] for r in rows[name]] for name in ("zero0", "zero2", "zero3")}
    gaps = {s: _relative_gap(losses[f"zero{s}"], losses["zero0"]) for s in (2, 3)}
    after_10 = {name: [r["loss"] for r in rows[name] if r["step"] > 10] for name in ("zero3", "zero3_resumed")}
    resume_gap = _relative_gap(after_10["zero3_resumed"], after_10["zero3"])
    line = (f"bf16, 2 ranks, {len(losses['zero0'])} steps: largest relative loss difference to stage 0 "
            f"{gaps[2]:.2g} at stage 2, {gaps[3]:.2g} at stage 3; stage 3 resumed from step 10: {resume_gap:.2g}")
    problems = [f"stage {s} differs from stage 0 by more than 2% ({gap:.2g})" for s, gap in gaps.items() if gap > 0.02]
    if resume_gap > 1e-3:
        problems.append(f"the resumed stage-3 run differs from the uninterrupted one ({resume_gap:.2g} > 1e-3)")
    return line, problems


CHECKS = {"doctor": doctor, "run": run, "resume": resume, "np2": np2, "stages": stages}


def main(argv) -> int:
    if len(argv) != 2 or argv[0] not in CHECKS:
        print(f"usage: gpu_check.py {{{','.join(CHECKS)}}} PATH", file=sys.stderr)
        return 2
    try:
        line, problems = CHECKS[argv[0]](argv[1])
    except (OSError, KeyError, ValueError, statistics.StatisticsError) as err:  # a run that wrote nothing usable
        print(f"cannot read what the run wrote: {type(err).__name__}: {err}")
        return 1
    print(line + "".join(f" | FAILED: {problem}" for problem in problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
