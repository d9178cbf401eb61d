"""Quality in a time budget: train a small model on --text (or --data) on 2 ranks for --budget-s, then score
the whole validation split."""
from __future__ import annotations

import json
from pathlib import Path

from hvd_llama.bench.common import Bench, horovodrun, job_step_s, num_params, python_module, run_evaluate
from hvd_llama.config import load_config
from hvd_llama.training.data import read_meta

# Published results on tiny Shakespeare (nanoGPT's README). Its model is character-level, so its loss per
# token is nats/char.
REFERENCES = [
    {"name": "nanoGPT shakespeare_char, CPU settings (README)", "nats_per_char": 1.88},
    {"name": "nanoGPT shakespeare_char, GPU settings (README, one A100)", "nats_per_char": 1.4697},
]
# The quality run: --quality-config (configs/tiny.yaml, ~1M parameters) with a vocabulary that suits a 1 MB
# text (4096 pieces would leave too few examples of each).
QUALITY_VOCAB = 1024


def bench_quality(b: Bench) -> dict:
    a = b.args
    if not a.text and not a.data:
        return {"skipped": "no --text FILE (e.g. tinyshakespeare.txt) or --data DIR given"}
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
    scores = run_evaluate(b, run_dir, data, "quality_eval_fp32")
    return {"text": a.text, "data": str(data), "split_method": meta.get("split_method"),
            "val_chars": meta["splits"]["val"]["chars"], "val_tokens": meta["splits"]["val"]["tokens"],
            "ranks": 2, "config": load_config(a.quality_config, train_sets).to_dict(), "params": num_params(cfg),
            "budget_s": a.budget_s, "calibration_step_s": calibration, "max_steps": max_steps,
            "steps": last["step"], "train_s": last["elapsed_s"], "train_wall_s": wall, "tokens": last["tokens"],
            "final_train_loss": last["loss"], "nats_per_char": scores["nats_per_char"],
            "bits_per_byte": scores["bits_per_byte"], "perplexity": scores["perplexity"], "eval": scores,
            "references": REFERENCES, "checkpoint": str(run_dir)}



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

