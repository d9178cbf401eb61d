"""Benchmarks: training throughput and MFU, Horovod scaling against DDP, quality in a time budget, generation
speed, and data-preparation speed.

    python -m hvd_llama.bench all --text ../shared/data/tinyshakespeare.txt --out bench_results.json
    python -m hvd_llama.bench throughput --config configs/small.yaml
    python -m hvd_llama.bench scaling --fp16-compression --fusion-threshold-mb 32

Each measurement runs in processes of its own (hvd_llama.bench_train, hvd_llama.bench_prepare, horovodrun,
torch.distributed.run, hvd_llama.train/evaluate/prepare); this process launches them, prints a table per
benchmark and rewrites the JSON report (atomically) after each one. A benchmark that fails is recorded with
its error and the others still run; the exit code is then 1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from hvd_llama.bench_prepare import write_corpus
from hvd_llama.cli import UserError, atomic_write_text, run_main
from hvd_llama.config import Config, load_config
from hvd_llama.data import read_meta
from hvd_llama.generate import benchmark_generation
from hvd_llama.model import Transformer

REPO = Path(__file__).resolve().parents[1]
MODES = ("throughput", "scaling", "quality", "generation", "prepare")
MB = 1e6  # megabytes are decimal throughout (as prepare reports them)
# Published results on tiny Shakespeare. nanoGPT's model is character-level, so its loss per token is nats/char.
REFERENCES = [
    {"name": "nanoGPT shakespeare_char, CPU settings, 140 s on this machine", "nats_per_char": 1.886},
    {"name": "nanoGPT shakespeare_char, GPU settings", "nats_per_char": 1.47},
]
# The quality run: --quality-config (configs/tiny.yaml, ~1M parameters: in 3 minutes on 2 cores it sees each
# token of a 1 MB text about 5 times) with a vocabulary that suits a 1 MB text (4096 pieces would leave too
# few examples of each).
QUALITY_VOCAB = 1024
PREPARE_MB = 1024  # the generated corpus (`all` takes ~11 minutes with it on 2 cores)
KV_SPEEDUP_TARGET = 5.0
ENCODE_EFFICIENCY_TARGET = 0.9


class BenchFailure(RuntimeError):
    """A measurement process failed: the benchmark is recorded as failed and the others go on."""


# ---------------------------------------------------------------------------------------------- processes

def job_env(extra: Optional[dict] = None) -> dict:
    """Our environment, with this Python's scripts on PATH and this package importable."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def python_module(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def horovodrun(np: int, command: Sequence[str]) -> list[str]:
    launcher = shutil.which("horovodrun", path=str(Path(sys.executable).parent)) or "horovodrun"
    return [launcher, "--gloo", "-np", str(np), "-H", f"localhost:{np}", *command]


def torchrun(np: int, module: str, *args) -> list[str]:
    return python_module("torch.distributed.run", "--standalone", "--nproc-per-node", np, "-m", module, *args)


def run_logged(command: Sequence[str], log: Path, timeout: float, env: Optional[dict] = None) -> float:
    """Run a command with its output in `log`; returns its wall time. The whole process group goes on a
    timeout or Ctrl-C, so no rank is left behind."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, env=job_env(env),
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout)
        except BaseException as err:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(err, subprocess.TimeoutExpired):
                raise BenchFailure(f"`{shlex.join(command)}` did not finish in {timeout:.0f} s "
                                   f"(--timeout-s); its log: {log}") from None
            raise
    if returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise BenchFailure(f"`{shlex.join(command)}` exited with {returncode}; the end of its log:\n{tail}")
    return time.perf_counter() - start


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------ context

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

    @property
    def threads(self) -> int:
        return self.args.threads or len(os.sched_getaffinity(0))

    def run(self, command: Sequence[str], log_name: str, env: Optional[dict] = None) -> float:
        return run_logged(command, self.work / "logs" / log_name, self.args.timeout_s, env)

    def horovod_ranks(self, np: int, name: str, config: Optional[str], sets: Sequence[str], env: dict,
                      warmup: int, steps: int) -> list[dict]:
        """Run bench_train's horovod measurement on np ranks; returns each rank's figures."""
        folder = self.work / name
        folder.mkdir(parents=True, exist_ok=True)
        self.run(horovodrun(np, python_module("hvd_llama.bench_train", "horovod", *self.config_args(config, sets),
                                              "--warmup", warmup, "--steps", steps, "--json-dir", folder)),
                 f"{name}.log", env)
        return [read_json(folder / f"rank{r}.json") for r in range(np)]


def flops_per_token(cfg: Config) -> float:
    with torch.device("meta"):  # counts only: no memory for the weights
        return Transformer(cfg.model).flops_per_token(cfg.train.seq_len)


def num_params(cfg: Config) -> int:
    with torch.device("meta"):
        return Transformer(cfg.model).num_params()


def job_step_s(ranks: list[dict], key: str = "step_s") -> float:
    """A job's step time: the slowest rank's median (every rank waits for the slowest in the allreduce)."""
    return max(statistics.median(r[key]) for r in ranks)


# ----------------------------------------------------------------------------------------------- throughput

def step_figures(seconds: list[float], tokens_per_step: int, flops_per_token: float, peak_flops: float) -> dict:
    step_s = statistics.median(seconds)
    tokens_per_s = tokens_per_step / step_s
    achieved = flops_per_token * tokens_per_s
    return {"step_s_median": step_s, "tokens_per_s": tokens_per_s, "achieved_flops": achieved,
            "mfu": achieved / peak_flops, "step_s": seconds}


def bench_throughput(b: Bench) -> dict:
    a = b.args
    out = b.work / "throughput.json"
    b.run(python_module("hvd_llama.bench_train", "throughput", *b.config_args(sets=a.set), "--warmup", a.warmup,
                        "--steps", a.steps, "--rounds", a.rounds, "--threads", b.threads, "--peak-n", a.peak_n,
                        "--json", out), "throughput.log")
    raw = read_json(out)
    per_token = flops_per_token(b.cfg)
    variants = {name: step_figures(seconds, b.tokens_per_step, per_token, raw["peak_flops"])
                for name, seconds in raw["step_s"].items()}
    return {"params": num_params(b.cfg), "batch_size": b.cfg.train.batch_size, "seq_len": b.cfg.train.seq_len,
            "tokens_per_step": b.tokens_per_step, "flops_per_token": per_token, "threads": raw["threads"],
            "precision": "fp32", "warmup_steps": a.warmup, "timed_steps": a.steps * a.rounds,
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


# -------------------------------------------------------------------------------------------------- scaling

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
        b.run(torchrun(2, "hvd_llama.bench_train", "ddp", *b.config_args(sets=sets), "--warmup", a.warmup,
                       "--steps", a.steps, "--bucket-cap-mb", bucket, "--json-dir", folder), f"{name}.log", env)
        return [read_json(folder / f"rank{r}.json") for r in range(2)]

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
            if key.endswith("_s"):
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


# -------------------------------------------------------------------------------------------------- quality

def bench_quality(b: Bench) -> dict:
    a = b.args
    if not a.text and not a.data:
        return {"skipped": "no --text FILE (e.g. ../shared/data/tinyshakespeare.txt) or --data DIR given"}
    folder = b.work / "quality"
    if a.data:
        data = Path(a.data)
    else:
        data = folder / "data"
        b.run(python_module("hvd_llama.prepare", "--input", a.text, "--out", data, "--vocab-size", a.vocab_size),
              "quality_prepare.log")
    meta = read_meta(data)
    sets = [*a.quality_set, f"data.dir={data}", f"model.vocab_size={meta['vocab_size']}"]
    cfg = load_config(a.quality_config, sets)
    env = {"OMP_NUM_THREADS": "1"}
    # One step's time on 2 ranks first, then as many steps as fit in the budget.
    calibration = job_step_s(b.horovod_ranks(2, "quality_calibration", a.quality_config, sets, env, 2, 5))
    max_steps = max(1, int(a.budget_s / calibration))
    run_dir = folder / "run"
    train_sets = [*sets, f"train.max_steps={max_steps}", "train.eval_every=0", "checkpoint.every=0",
                  "log.tensorboard=false", f"log.every={max(1, max_steps // 10)}"]
    wall = b.run(horovodrun(2, python_module("hvd_llama.train", *b.config_args(a.quality_config, train_sets),
                                             "--run-dir", run_dir)), "quality_train.log", env)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    scores = evaluate(b, run_dir, data, "quality_eval_fp32")
    return {"text": a.text, "data": str(data), "split_method": meta.get("split_method"),
            "val_chars": meta["splits"]["val"]["chars"], "val_tokens": meta["splits"]["val"]["tokens"],
            "ranks": 2, "config": load_config(a.quality_config, train_sets).to_dict(), "params": num_params(cfg),
            "budget_s": a.budget_s, "calibration_step_s": calibration, "max_steps": max_steps,
            "steps": last["step"], "train_s": last["elapsed_s"], "train_wall_s": wall, "tokens": last["tokens"],
            "final_train_loss": last["loss"], "nats_per_char": scores["nats_per_char"],
            "bits_per_byte": scores["bits_per_byte"], "perplexity": scores["perplexity"], "eval": scores,
            "references": REFERENCES, "checkpoint": str(run_dir)}


def evaluate(b: Bench, checkpoint: Path, data: Optional[Path], name: str, quantize: Optional[str] = None) -> dict:
    """hvd_llama.evaluate on a whole validation split, in one process."""
    out = b.work / f"{name}.json"
    b.run(python_module("hvd_llama.evaluate", "--checkpoint", checkpoint, *(["--data", data] if data else []),
                        *(["--quantize", quantize] if quantize else []), "--json", out), f"{name}.log")
    return read_json(out)


def show_quality(r: dict) -> list[str]:
    m, t = r["config"]["model"], r["config"]["train"]
    refs = "; ".join(f"{x['name']}: {x['nats_per_char']}" for x in r["references"])
    return [f"{r['text'] or r['data']}: {r['params'] / 1e6:.2f}M-parameter model (dim {m['dim']}, {m['n_layers']} "
            f"layers, vocab {m['vocab_size']}), 2 ranks x {t['batch_size']} x {t['seq_len']} tokens/step",
            f"{r['steps']} steps in {r['train_s']:.0f} s of training (budget {r['budget_s']:.0f} s; "
            f"{r['train_wall_s']:.0f} s with start-up), {r['tokens']:,} tokens, final train loss "
            f"{r['final_train_loss']:.3f}",
            f"validation ({r['val_chars']:,} chars, whole split): {r['nats_per_char']:.3f} nats/char | "
            f"{r['bits_per_byte']:.3f} bits/byte | ppl {r['perplexity']:.1f}/token",
            f"references (nats/char): {refs}"]


# ----------------------------------------------------------------------------------------------- generation

def bench_generation(b: Bench) -> dict:
    a = b.args
    torch.set_num_threads(b.threads)
    # Random weights decode as fast as trained ones; the context grows to fit the prompt and new tokens.
    model_cfg = replace(b.cfg.model, max_seq_len=max(b.cfg.model.max_seq_len, a.prompt_len + a.new_tokens))
    torch.manual_seed(b.cfg.train.seed)
    model = Transformer(model_cfg).eval()
    speeds = benchmark_generation(model, prompt_len=a.prompt_len, new_tokens=a.new_tokens, batch_size=1,
                                  repeats=a.gen_repeats)
    kv, no_kv, int8 = speeds["kv_cache"], speeds["no_kv_cache"], speeds["int8_kv_cache"]
    result = {"params": num_params(b.cfg), "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "batch_size": 1,
              "max_seq_len": model_cfg.max_seq_len, "threads": torch.get_num_threads(),
              "tokens_per_s": {"fp32_kv_cache": kv, "fp32_no_kv_cache": no_kv, "int8_kv_cache": int8},
              "kv_speedup": kv / no_kv, "int8_speedup": int8 / kv,
              "kv_speedup_target": KV_SPEEDUP_TARGET, "kv_speedup_target_met": kv / no_kv >= KV_SPEEDUP_TARGET}
    result["int8_perplexity"] = int8_perplexity(b)
    return result


def int8_perplexity(b: Bench) -> dict:
    """Validation perplexity of a trained checkpoint in fp32 and int8: --checkpoint, else quality's run."""
    quality = b.results.get("quality", {})
    checkpoint = b.args.checkpoint or quality.get("checkpoint")
    if not checkpoint:
        return {"skipped": "no checkpoint: run quality first (or all), or pass --checkpoint"}
    data = Path(b.args.data) if b.args.data else (Path(quality["data"]) if "data" in quality else None)
    fp32 = quality["eval"] if checkpoint == quality.get("checkpoint") else \
        evaluate(b, Path(checkpoint), data, "generation_eval_fp32")
    int8 = evaluate(b, Path(checkpoint), data, "generation_eval_int8", quantize="int8")
    return {"checkpoint": str(checkpoint), "fp32": fp32["perplexity"], "int8": int8["perplexity"],
            "change": int8["perplexity"] / fp32["perplexity"] - 1,
            "fp32_nats_per_char": fp32["nats_per_char"], "int8_nats_per_char": int8["nats_per_char"]}


def show_generation(r: dict) -> list[str]:
    tps = r["tokens_per_s"]
    rows = [("fp32, no KV cache", f"{tps['fp32_no_kv_cache']:,.1f}", "1.00x"),
            ("fp32, KV cache", f"{tps['fp32_kv_cache']:,.1f}", f"{r['kv_speedup']:.2f}x"),
            ("int8, KV cache", f"{tps['int8_kv_cache']:,.1f}", f"{r['int8_speedup'] * r['kv_speedup']:.2f}x")]
    met = "met" if r["kv_speedup_target_met"] else "NOT MET"
    lines = [f"{r['params'] / 1e6:.1f}M parameters, random weights, {r['prompt_len']}-token prompt + {r['new_tokens']} "
             f"new tokens, batch 1, {r['threads']} threads, greedy",
             *table(("decoding", "tokens/s", "vs no cache"), rows),
             f"KV cache speed-up {r['kv_speedup']:.1f}x (target >= {r['kv_speedup_target']:.0f}x: {met}); "
             f"int8 vs fp32 with cache: {r['int8_speedup']:.2f}x"]
    ppl = r["int8_perplexity"]
    if "skipped" in ppl:
        lines.append(f"int8 perplexity: skipped ({ppl['skipped']})")
    else:
        lines.append(f"validation perplexity of {ppl['checkpoint']}: fp32 {ppl['fp32']:.3f} -> int8 {ppl['int8']:.3f} "
                     f"({100 * ppl['change']:+.2f}%)")
    return lines


# -------------------------------------------------------------------------------------------------- prepare

def measure_prepare(b: Bench, inputs: Sequence[str], out: Path, name: str) -> dict:
    """Wall time, MB/s of input and peak memory of `python -m hvd_llama.prepare` (a fresh process tree)."""
    usage_json = b.work / f"{name}_rusage.json"
    b.run(python_module("hvd_llama.bench_prepare", "rusage", "--json", usage_json, "--",
                        *python_module("hvd_llama.prepare", "--input", *inputs, "--out", out)), f"{name}.log")
    usage, meta = read_json(usage_json), read_meta(out)
    n_bytes = meta["inputs"]["bytes"]
    splits = meta["splits"].values()
    return {"input": list(inputs), "input_bytes": n_bytes, "documents": sum(s["documents"] for s in splits),
            "tokens": sum(s["tokens"] for s in splits), "seconds": usage["seconds"],
            "mb_per_s": n_bytes / MB / usage["seconds"], "prepare_reported_s": meta["seconds"],
            "peak_rss_bytes": usage["max_rss_bytes"], "workers": meta["settings"]["workers"]}


def bench_prepare(b: Bench) -> dict:
    a = b.args
    folder = b.work / "prepare"
    folder.mkdir(parents=True, exist_ok=True)
    stdlib = measure_prepare(b, ["stdlib"], folder / "stdlib", "prepare_stdlib")
    corpus = folder / "corpus.jsonl"
    start = time.perf_counter()
    corpus_bytes = write_corpus(corpus, int(a.prepare_mb * MB))
    write_s = time.perf_counter() - start
    try:
        generated = measure_prepare(b, [str(corpus)], folder / "generated", "prepare_generated")
    finally:  # gigabytes: do not keep them around
        corpus.unlink(missing_ok=True)
        shutil.rmtree(folder / "generated", ignore_errors=True)
    generated.update(requested_mb=a.prepare_mb, corpus_bytes=corpus_bytes, corpus_write_s=write_s)
    encode_json = folder / "encode.json"
    workers = len(os.sched_getaffinity(0))
    b.run(python_module("hvd_llama.bench_prepare", "encode", "--json", encode_json, "--tokenizer",
                        folder / "stdlib" / "tokenizer.model", "--mb", a.encode_mb, "--workers", workers,
                        "--folder", folder / "encode"), "prepare_encode.log")
    raw = read_json(encode_json)
    speeds = {k: raw["bytes"] / MB / raw[f"{k}_s"]
              for k in ("sentencepiece_single", "encode_single", "encode_parallel")}
    efficiency = speeds["encode_parallel"] / (speeds["sentencepiece_single"] * workers)
    return {"stdlib": stdlib, "generated": generated,
            "encode": {"bytes": raw["bytes"], "documents": raw["documents"], "workers": workers,
                       "mb_per_s": speeds, "parallel_efficiency": efficiency,
                       "target": ENCODE_EFFICIENCY_TARGET, "target_met": efficiency >= ENCODE_EFFICIENCY_TARGET},
            "peak_rss_note": "ru_maxrss of RUSAGE_CHILDREN: the largest single process of prepare's process tree"}


def show_prepare(r: dict) -> list[str]:
    rows = [(name, f"{p['input_bytes'] / MB:,.1f}", f"{p['seconds']:.1f}", f"{p['mb_per_s']:.2f}",
             f"{p['peak_rss_bytes'] / MB:,.0f}", f"{p['tokens']:,}")
            for name, p in (("--input stdlib", r["stdlib"]), (f"generated {r['generated']['requested_mb']:g} MB corpus",
                                                              r["generated"]))]
    e = r["encode"]
    speeds = e["mb_per_s"]
    met = "met" if e["target_met"] else "NOT MET"
    return [*table(("prepare", "input MB", "seconds", "MB/s", "peak RSS MB", "tokens"), rows),
            f"encode {e['bytes'] / MB:.0f} MB: SentencePiece alone 1 process "
            f"{speeds['sentencepiece_single']:.2f} MB/s | "
            f"encode_batches 1 process {speeds['encode_single']:.2f} MB/s | {e['workers']} workers "
            f"{speeds['encode_parallel']:.2f} MB/s",
            f"parallel encode = {100 * e['parallel_efficiency']:.0f}% of {e['workers']} x SentencePiece alone "
            f"(target >= {100 * e['target']:.0f}%: {met})"]


# ----------------------------------------------------------------------------------------------- the report

BENCHMARKS: dict[str, tuple[Callable[[Bench], dict], Callable[[dict], list[str]]]] = {
    "throughput": (bench_throughput, show_throughput), "scaling": (bench_scaling, show_scaling),
    "quality": (bench_quality, show_quality), "generation": (bench_generation, show_generation),
    "prepare": (bench_prepare, show_prepare),
}


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """Aligned text table: the first column left-aligned, the others right-aligned."""
    cells = [list(map(str, headers))] + [list(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in cells]


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


def resolve_config(path: Optional[str], option: str) -> Optional[str]:
    """A config path as given, or relative to this repository (so the defaults work from any folder)."""
    if path is None or Path(path).is_file():
        return path
    if not Path(path).is_absolute() and (REPO / path).is_file():
        return str(REPO / path)
    raise UserError(f"{option} {path} does not exist")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hvd_llama.bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Example: python -m hvd_llama.bench all --text ../shared/data/tinyshakespeare.txt "
               "--out bench_results.json")
    parser.add_argument("mode", choices=(*MODES, "all"), help="which benchmark (all: every one, in this order)")
    parser.add_argument("--config", default="configs/small.yaml",
                        help="model and batch of throughput, scaling and generation")
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
    g.add_argument("--rounds", type=int, default=2, help="rounds: the variants (throughput) or jobs (scaling) "
                                                         "take turns this many times")
    g.add_argument("--peak-n", type=int, default=2048, help="size of the square fp32 matmul of the measured peak")
    g.add_argument("--fp16-compression", action="store_true", help="scaling: fp16 gradients in the allreduce")
    g.add_argument("--fusion-threshold-mb", type=float, help="scaling: HOROVOD_FUSION_THRESHOLD (and DDP's bucket)")
    g.add_argument("--cycle-time-ms", type=float, help="scaling: HOROVOD_CYCLE_TIME")
    g = parser.add_argument_group("quality")
    g.add_argument("--text", help="text file to train on (last 10%% of characters held out); quality needs this "
                                  "or --data, and `all` skips quality without them")
    g.add_argument("--data", help="an already prepared data folder instead of --text")
    g.add_argument("--budget-s", type=float, default=180, help="training wall-clock budget (2 ranks)")
    g.add_argument("--quality-config", default="configs/tiny.yaml", help="model and batch of the quality run")
    g.add_argument("--quality-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of --quality-config (repeatable)")
    g.add_argument("--vocab-size", type=int, default=QUALITY_VOCAB, help="tokenizer trained on --text's train split")
    g = parser.add_argument_group("generation")
    g.add_argument("--new-tokens", type=int, default=256, help="tokens generated per run")
    g.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens")
    g.add_argument("--gen-repeats", type=int, default=3, help="timed runs of each decoding (the fastest is kept)")
    g.add_argument("--checkpoint", help="checkpoint for the fp32 -> int8 perplexity change (default: quality's)")
    g = parser.add_argument_group("prepare")
    g.add_argument("--prepare-mb", type=float, default=PREPARE_MB, help="size of the generated corpus")
    g.add_argument("--encode-mb", type=float, default=32, help="text encoded for the single vs parallel comparison")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    args.config = resolve_config(args.config, "--config")
    args.quality_config = resolve_config(args.quality_config, "--quality-config")
    positive = {"--warmup": args.warmup + 1, "--steps": args.steps, "--rounds": args.rounds, "--peak-n": args.peak_n,
                "--budget-s": args.budget_s, "--new-tokens": args.new_tokens, "--prompt-len": args.prompt_len,
                "--gen-repeats": args.gen_repeats, "--prepare-mb": args.prepare_mb, "--encode-mb": args.encode_mb,
                "--timeout-s": args.timeout_s, "--threads": args.threads + 1}
    for option, value in positive.items():
        if value <= 0:
            raise UserError(f"{option} must be {'>= 0' if option in ('--warmup', '--threads') else '> 0'}")
    if args.mode == "quality" and not args.text and not args.data:
        raise UserError("quality needs --text FILE (e.g. ../shared/data/tinyshakespeare.txt) or --data DIR")
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
            except (BenchFailure, OSError, RuntimeError, ValueError, KeyError) as err:
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


if __name__ == "__main__":
    main()
