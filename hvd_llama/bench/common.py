"""What every benchmark shares: its measurement processes (started, logged, killed as a group on a timeout),
the run's context, figures of the model and of a job's ranks over rounds, and a summary of Horovod's timeline."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

import hvd_llama
from hvd_llama import procs
from hvd_llama.config import Config
from hvd_llama.files import read_json
from hvd_llama.model import Transformer

PACKAGE_ROOT = Path(hvd_llama.__file__).resolve().parents[1]  # the folder this hvd_llama is imported from
MB = 1e6  # megabytes are decimal throughout (as prepare reports them)

PHASES = ("reduce_gradients", "clip_grad_norm_", "step")  # the optimizer's calls in train_step, after backward


class BenchFailure(RuntimeError):
    """A measurement process failed: the benchmark is recorded as failed and the others go on."""


def job_env(extra: Optional[dict] = None) -> dict:
    """Our environment, with this Python's scripts on PATH and this copy of hvd_llama importable."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def python_module(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


CONTROLLERS = ("gloo", "mpi")  # horovodrun --gloo, or horovodrun without it (mpirun underneath)


def horovodrun(np: int, command: Sequence[str], controller: str = "gloo", options: Sequence[str] = ()) -> list[str]:
    launcher = shutil.which("horovodrun", path=str(Path(sys.executable).parent)) or "horovodrun"
    gloo = ["--gloo"] if controller == "gloo" else []
    return [launcher, *gloo, "-np", str(np), "-H", f"localhost:{np}", *map(str, options), *command]


def torchrun(np: int, module: str, *args) -> list[str]:
    return python_module("torch.distributed.run", "--standalone", "--nproc-per-node", np, "-m", module, *args)


def run_logged(command: Sequence[str], log: Path, timeout: float, env: Optional[dict] = None) -> float:
    """Run a command with its output in `log`; returns its wall time. Its whole process tree goes on a timeout,
    Ctrl-C, or this process's death (even by SIGKILL), so no rank is left behind."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, env=job_env(env),
                                start_new_session=True)
        try:
            with procs.reaped(proc):
                returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.wait()
            raise BenchFailure(f"`{shlex.join(command)}` did not finish in {timeout:.0f} s "
                               f"(--timeout-s); its log: {log}") from None
    if returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise BenchFailure(f"`{shlex.join(command)}` exited with {returncode}; the end of its log:\n{tail}")
    return time.perf_counter() - start




def read_measurement(path: Path) -> dict:
    return read_json(path, "measurement")


@dataclass
class Bench:
    args: argparse.Namespace
    cfg: Config  # --config with --set: the model of throughput, scaling and generation
    work: Path  # measurement files, logs, prepared data, the quality run
    results: dict  # benchmark -> result so far (generation uses quality's checkpoint)

    def config_args(self, config: Optional[str] = None, sets: Sequence[str] = ()) -> list[str]:
        config = config or self.args.config
        return (["--config", config] if config else []) + [a for s in sets for a in ("--set", s)]

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.seq_len

    def rounds(self, default: int) -> int:
        """--rounds, or the benchmark's own number when it is not given."""
        return default if self.args.rounds is None else self.args.rounds

    @property
    def threads(self) -> int:
        return self.args.threads or len(os.sched_getaffinity(0))

    def run(self, command: Sequence[str], log_name: str, env: Optional[dict] = None) -> float:
        return run_logged(command, self.work / "logs" / log_name, self.args.timeout_s, env)

    def horovod_ranks(self, np: int, name: str, config: Optional[str], sets: Sequence[str], env: dict,
                      warmup: int, steps: int, measurement: str = "horovod", controller: str = "gloo",
                      options: Sequence[str] = ()) -> list[dict]:
        """Run a train_steps measurement (horovod or memory) on np ranks under horovodrun (with its `options`);
        returns each rank's figures."""
        folder = self.work / name
        folder.mkdir(parents=True, exist_ok=True)
        command = python_module("hvd_llama.bench.train_steps", measurement, *self.config_args(config, sets),
                                "--warmup", warmup, "--steps", steps, "--json-dir", folder)
        self.run(horovodrun(np, command, controller, options), f"{name}.log", env)
        return [read_measurement(folder / f"rank{r}.json") for r in range(np)]


def flops_per_token(cfg: Config) -> float:
    with torch.device("meta"):  # counts only: no memory for the weights
        return Transformer(cfg.model).flops_per_token(cfg.train.seq_len)


def num_params(cfg: Config) -> int:
    with torch.device("meta"):
        return Transformer(cfg.model).num_params()


def job_step_s(ranks: list[dict], key: str = "step_s") -> float:
    """A job's step time: the slowest rank's median (every rank waits for the slowest in the allreduce)."""
    return max(statistics.median(r[key]) for r in ranks)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def horovod_rounds(jobs: list[list[dict]]) -> dict:
    """The same Horovod job, once per round: its step time (per round the slowest rank's median) with its median
    and spread over rounds, and per optimizer call the median over rounds of the slowest rank's median."""
    phases = [{p: max(statistics.median(r["phase_s"][p]) for r in ranks) for p in PHASES} for ranks in jobs]
    return {"step_s": spread([job_step_s(ranks) for ranks in jobs]),
            "phase_s_median": {p: statistics.median(f[p] for f in phases) for p in PHASES}}


def target_check(value: float, per_round: list[float], passes: Callable[[float], bool]) -> dict:
    """A target on a figure of the medians, and whether every round's own figure gives the same verdict (when
    they disagree, the verdict says more about the machine's load than about what is measured)."""
    return {"ratio": value, "met": passes(value), "rounds_agree": len({passes(x) for x in per_round}) == 1,
            "per_round": per_round}


def ratio_check(step: dict, base: dict, target: float) -> dict:
    """Step times (spread()'s) against `base`'s: median over median and within each round (the jobs of a round ran
    back to back), checked against `target`."""
    per_round = [x / y for x, y in zip(step["rounds"], base["rounds"])]
    return target_check(step["median"] / base["median"], per_round, lambda ratio: ratio <= target)


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """Aligned text table: the first column left-aligned, the others right-aligned."""
    cells = [list(map(str, headers))] + [list(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in cells]


def run_evaluate(b: Bench, checkpoint: Path, data: Optional[Path], name: str,
                 quantize: Optional[str] = None) -> dict:
    """hvd_llama.evaluate on a whole validation split, in one process."""
    out = b.work / f"{name}.json"
    b.run(python_module("hvd_llama.evaluate", "--checkpoint", checkpoint, *(["--data", data] if data else []),
                        *(["--quantize", quantize] if quantize else []), "--json", out), f"{name}.log")
    return read_measurement(out)


# ---- Horovod's timeline ---------------------------------------------------------------------------------------
# What a timeline's tensor names say about their op (hvd_llama's names: parallel/zero.py, compute.py).
SMALL_ALLREDUCES = ("allreduce.step.targets", "allreduce.zero.grad_norm")


def timeline_path(out: Path, *parts: str) -> Path:
    """Where a job's timeline goes: next to the report, <report stem>_timeline_<parts>.json."""
    return out.with_name("_".join([out.stem, "timeline", *parts]) + ".json")


def read_timeline(path: Path) -> list[dict]:
    """Chrome-trace events; Horovod leaves the closing bracket out when a job ends before it flushes."""
    text = path.read_text().strip().rstrip(",")
    return json.loads(text if text.endswith("]") else text + "]")


def op_intervals(events: list[dict]) -> list[tuple[str, str, int, int]]:
    """(tensor name, activity, start us, end us) of every top-level activity (NEGOTIATE_*, ALLREDUCE, ...) of
    every tensor; nested ones (MEMCPY_IN_FUSION_BUFFER, GLOO_ALLREDUCE, ...) are inside their op's span."""
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name" and "name" in e.get("args", {})}
    stacks: dict[int, list] = {}
    spans = []
    for e in events:
        if e.get("ph") == "B":
            stacks.setdefault(e["pid"], []).append((e["name"], e["ts"]))
        elif e.get("ph") == "E" and stacks.get(e["pid"]):
            activity, start = stacks[e["pid"]].pop()
            if not stacks[e["pid"]]:
                spans.append((names.get(e["pid"], ""), activity, start, e["ts"]))
    return spans


def category(tensor: str, activity: str) -> str:
    if activity.startswith("NEGOTIATE") or activity == "BROADCAST":
        return ""  # waiting for the other rank, or the start-up broadcast: not a step's communication
    if tensor in SMALL_ALLREDUCES:
        return "small allreduces (target count, grad norm)"
    # a reduce-scatter, or under Gloo an allreduce of which the slice is kept (Horovod prefixes the op's name)
    if tensor.partition(".")[2].startswith("zero.grad."):
        return "gradient reduction into slices"
    return {"ALLREDUCE": "gradient allreduce", "ALLGATHER": "weight all-gather"}.get(activity, activity.lower())


def union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping spans merged: a fused allreduce shows once per tensor, but runs once."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def summarize_timeline(path: Path, steps: int) -> dict:
    """Rank 0's view, over all `steps` (warm-up included): per kind of op, how many ran (fused ones once), their
    median and largest duration, and the time some op of that kind was running, per step."""
    spans: dict[str, list] = {}
    for tensor, activity, start, end in op_intervals(read_timeline(path)):
        kind = category(tensor, activity)
        if kind:
            spans.setdefault(kind, []).append((start, end))
    summary = {}
    for kind, found in sorted(spans.items()):
        ops = [(e - s) / 1e3 for s, e in union(found)]
        summary[kind] = {"ops": len(ops), "op_ms_median": statistics.median(ops), "op_ms_max": max(ops),
                         "busy_ms_per_step": sum(ops) / steps}
    return {"steps": steps, "ops": summary}


def timeline_line(summary: dict) -> str:
    return ", ".join(f"{kind} {o['ops']} ops {o['busy_ms_per_step']:.0f} ms/step (median {o['op_ms_median']:.1f}, "
                     f"max {o['op_ms_max']:.1f} ms)" for kind, o in summary["ops"].items())


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` timed calls: other load on the machine only ever adds time."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best
