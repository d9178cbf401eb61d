"""Benchmarks: training throughput and MFU, Horovod scaling against DDP and the no-communication ceiling, quality
in a time budget, generation speed, data-preparation speed, the ZeRO stages' memory and step time, and stage 3
against PyTorch FSDP2.

    python -m hvd_llama.bench all --text tinyshakespeare.txt --out bench_results.json
    python -m hvd_llama.bench throughput --config configs/small.yaml
    python -m hvd_llama.bench scaling --scaling-stages 0 --controllers gloo --fusion-threshold-mb 32
    python -m hvd_llama.bench memory --memory-np 1 2 3
    python -m hvd_llama.bench stages --controllers gloo --stage-rounds 5
    python -m hvd_llama.bench fsdp --stage-rounds 5

Each measurement runs in processes of its own (hvd_llama.bench.train_steps, hvd_llama.bench.prepare_steps,
horovodrun, torch.distributed.run, hvd_llama.train/evaluate/prepare); this process launches them, prints a
table per benchmark and rewrites the JSON report (atomically) after each one. A benchmark that fails is
recorded with its error and the others still run; the exit code is then 1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from hvd_llama.bench import fsdp, generation, memory, prepare, quality, scaling, stages, throughput
from hvd_llama.bench.common import CONTROLLERS, Bench, BenchFailure
from hvd_llama.cli import UserError, run_main
from hvd_llama.config import load_config
from hvd_llama.files import atomic_write_text
from hvd_llama.training.data import read_meta

MODES = ("throughput", "scaling", "quality", "generation", "prepare", "memory", "stages", "fsdp")
BENCHMARKS: dict[str, tuple[Callable[[Bench], dict], Callable[[dict], list[str]]]] = {
    "throughput": (throughput.bench_throughput, throughput.show_throughput),
    "scaling": (scaling.bench_scaling, scaling.show_scaling),
    "quality": (quality.bench_quality, quality.show_quality),
    "generation": (generation.bench_generation, generation.show_generation),
    "prepare": (prepare.bench_prepare, prepare.show_prepare),
    "memory": (memory.bench_memory, memory.show_memory),
    "stages": (stages.bench_stages, stages.show_stages),
    "fsdp": (fsdp.bench_fsdp, fsdp.show_fsdp),
}


def show(mode: str, result: dict) -> str:
    title = f"== {mode} ({result['wall_s']:.0f} s) =="
    if "error" in result:
        body = [f"FAILED: {result['error']}"]
    elif "skipped" in result:
        body = [f"skipped: {result['skipped']}"]
    else:
        body = BENCHMARKS[mode][1](result)
    return "\n".join([title, *body])


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "platform": platform.platform(), "load_average_at_start": os.getloadavg()}


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("horovod", "numpy", "sentencepiece"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def check_config(path: Optional[str], option: str) -> None:
    if path is not None and not Path(path).is_file():
        raise UserError(f"{option} {path} does not exist (the presets are in the repository's configs/ folder: "
                        f"run from there or pass {option} FILE)")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hvd_llama.bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Example: python -m hvd_llama.bench all --text tinyshakespeare.txt "
               "--out bench_results.json")
    parser.add_argument("mode", choices=(*MODES, "all"), help="which benchmark (all: every one, in this order)")
    parser.add_argument("--config", default="configs/small.yaml",
                        help="model and batch of throughput, scaling, generation and stages")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a value of --config (repeatable)")
    parser.add_argument("--out", default="bench_results.json", help="JSON report, rewritten after each benchmark")
    parser.add_argument("--work-dir", help="keep measurement files, logs and the quality run here "
                                           "(default: a temporary folder, removed at the end)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of single-process runs; 0 = all cores")
    parser.add_argument("--timeout-s", type=float, default=900, help="limit for each measurement process")
    g = parser.add_argument_group("throughput and scaling")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    g.add_argument("--steps", type=int, default=5, help="timed steps per round")
    g.add_argument("--rounds", type=int, help="rounds: the variants (throughput) or jobs (scaling) take turns "
                                              f"this many times; unset: {throughput.ROUNDS} for throughput, "
                                              f"{scaling.ROUNDS} for scaling")
    g.add_argument("--peak-n", type=int, default=2048, help="size of the square fp32 matmul of the measured peak")
    g.add_argument("--fp16-compression", action="store_true", help="scaling: fp16 gradients in the allreduce")
    g.add_argument("--fusion-threshold-mb", type=float, help="scaling: HOROVOD_FUSION_THRESHOLD (and DDP's bucket)")
    g.add_argument("--cycle-time-ms", type=float, help="scaling: HOROVOD_CYCLE_TIME")
    g.add_argument("--scaling-stages", type=int, nargs="+", choices=stages.STAGES, default=[0, 2],
                   help="scaling: the ZeRO stages (dist.zero_stage) of the Horovod np=2 runs, under each of "
                        "--controllers")
    g = parser.add_argument_group("quality")
    g.add_argument("--text", help="text file to train on (last 10%% of characters held out); quality needs this "
                                  "or --data, and `all` skips quality without them")
    g.add_argument("--data", help="an already prepared data folder instead of --text")
    g.add_argument("--budget-s", type=float, default=180, help="training wall-clock budget (2 ranks)")
    g.add_argument("--quality-config", default="configs/tiny.yaml", help="model and batch of the quality run")
    g.add_argument("--quality-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of --quality-config (repeatable)")
    g.add_argument("--vocab-size", type=int, default=quality.QUALITY_VOCAB, help="tokenizer trained on --text's train split")
    g = parser.add_argument_group("generation")
    g.add_argument("--new-tokens", type=int, default=256, help="tokens generated per run")
    g.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens")
    g.add_argument("--gen-repeats", type=int, default=3, help="timed runs of each decoding (the fastest is kept)")
    g.add_argument("--checkpoint", help="checkpoint for the fp32 -> int8 perplexity change (default: quality's)")
    g = parser.add_argument_group("prepare")
    g.add_argument("--prepare-mb", type=float, default=prepare.PREPARE_MB,
                   help=f"size of the larger generated corpus (the smaller is 1/{prepare.GROWTH} of it)")
    g.add_argument("--encode-mb", type=float, default=32, help="text encoded for the single vs parallel comparison")
    g = parser.add_argument_group("memory (ZeRO stages 0/1/2: state bytes and peak RSS per rank)")
    g.add_argument("--memory-config", default="configs/small.yaml", help="base config of the memory benchmark")
    g.add_argument("--memory-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of --memory-config (repeatable); without any: a ~100M-parameter model, "
                        "batch 2 x 256 (" + " ".join(memory.MODEL_100M) + ")")
    g.add_argument("--memory-np", type=int, nargs="+", default=[1, 2], help="world sizes measured")
    g.add_argument("--memory-steps", type=int, default=2, help="training steps per job (>= 2: AdamW's state exists "
                                                               "from the first step on)")
    g = parser.add_argument_group("stages and fsdp (ZeRO stages 1 and 2 against 0; stage 3 against 0 and PyTorch "
                                  "FSDP2: step time at np=2, --config's model)")
    g.add_argument("--stage-rounds", type=int, default=3, help="rounds in which the jobs take turns")
    g.add_argument("--controllers", nargs="+", choices=CONTROLLERS, default=list(CONTROLLERS),
                   help="Horovod controllers measured (by stages, fsdp and scaling): gloo (horovodrun --gloo), mpi "
                        "(horovodrun over mpirun)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    check_config(args.config, "--config")
    check_config(args.quality_config, "--quality-config")
    check_config(args.memory_config, "--memory-config")
    positive = {"--warmup": args.warmup + 1, "--steps": args.steps, "--peak-n": args.peak_n,
                "--rounds": 1 if args.rounds is None else args.rounds,  # unset: each benchmark's own number
                "--budget-s": args.budget_s, "--new-tokens": args.new_tokens, "--prompt-len": args.prompt_len,
                "--gen-repeats": args.gen_repeats, "--prepare-mb": args.prepare_mb, "--encode-mb": args.encode_mb,
                "--timeout-s": args.timeout_s, "--threads": args.threads + 1, "--memory-steps": args.memory_steps - 1,
                "--memory-np": min(args.memory_np), "--stage-rounds": args.stage_rounds}
    for option, value in positive.items():
        if value <= 0:
            floor = {"--warmup": ">= 0", "--threads": ">= 0", "--memory-steps": ">= 2"}.get(option, "> 0")
            raise UserError(f"{option} must be {floor}, got {getattr(args, option[2:].replace('-', '_'))}")
    if args.mode == "quality" and not args.text and not args.data:
        raise UserError("quality needs --text FILE (e.g. tinyshakespeare.txt) or --data DIR")
    if args.text and not Path(args.text).is_file():
        raise UserError(f"--text {args.text} does not exist")
    if args.data:
        read_meta(args.data)
    if args.checkpoint and not Path(args.checkpoint).exists():
        raise UserError(f"--checkpoint {args.checkpoint} does not exist")


def _main(argv: Optional[Sequence[str]]) -> dict:
    args = parse_args(argv)
    check_args(args)
    cfg = load_config(args.config, args.set)
    load_config(args.quality_config, args.quality_set)  # fail now on a bad override, not later
    load_config(args.memory_config, args.memory_set)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": shlex.join(["python", "-m", "hvd_llama.bench", *(argv if argv is not None else sys.argv[1:])]),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
              "versions": versions(), "threads": args.threads or len(os.sched_getaffinity(0)),
              "config": {"path": args.config, "overrides": args.set, **cfg.to_dict()}, "results": {}}
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="hvd_llama_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, cfg, work, report["results"])
    start, failed = time.perf_counter(), []
    try:
        for mode in MODES if args.mode == "all" else (args.mode,):
            mode_start = time.perf_counter()
            print(f"running {mode} ...", file=sys.stderr, flush=True)
            try:
                result = BENCHMARKS[mode][0](bench)
            except (BenchFailure, UserError, OSError, RuntimeError, ValueError, KeyError) as err:
                traceback.print_exc()
                result = {"error": f"{type(err).__name__}: {err}"}
                failed.append(mode)
            result["wall_s"] = time.perf_counter() - mode_start
            report["results"][mode] = result
            report["wall_s"] = time.perf_counter() - start
            report["machine"]["load_average_at_end"] = os.getloadavg()
            atomic_write_text(out, json.dumps(report, indent=2) + "\n")
            print(show(mode, result) + "\n", flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{len(report['results'])} benchmark(s) in {report['wall_s']:.0f} s; report: {out}", flush=True)
    if failed:
        print(f"error: failed: {', '.join(failed)}", file=sys.stderr, flush=True)
        sys.exit(1)
    return report


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(_main, argv)
