"""Generation speed of a model with random weights (fp32 with and without the KV cache, int8 with it), and
the validation perplexity change of a trained checkpoint under int8."""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from hvd_llama.bench.common import Bench, best_seconds, num_params, run_evaluate, table
from hvd_llama.model import Transformer
from hvd_llama.use.decoding import generate
from hvd_llama.use.inference import layout_for_decoding, quantize_int8

KV_SPEEDUP_TARGET = 5.0


def tokens_per_second(model: nn.Module, prompt_len: int = 16, new_tokens: int = 48, batch_size: int = 1,
                      use_kv_cache: bool = True, repeats: int = 3) -> float:
    """Generated tokens per second (all rows, prefill included) of greedy decoding from random prompts, best
    of `repeats` runs after one warm-up; no EOS stop, so every run produces batch_size * new_tokens tokens."""
    prompts = torch.randint(3, model.cfg.vocab_size, (batch_size, prompt_len),
                            generator=torch.Generator().manual_seed(0)).tolist()

    def run() -> None:
        generate(model, prompts, new_tokens, temperature=0, use_kv_cache=use_kv_cache)

    run()  # warm-up
    return batch_size * new_tokens / best_seconds(run, repeats)


def benchmark_generation(model: nn.Module, prompt_len: int = 16, new_tokens: int = 48, batch_size: int = 1,
                         repeats: int = 3) -> dict:
    """Generation tokens/s of an fp32 CPU model with the KV cache, without it, and int8-quantized with it."""
    model = layout_for_decoding(copy.deepcopy(model).cpu().eval())
    args = dict(prompt_len=prompt_len, new_tokens=new_tokens, batch_size=batch_size, repeats=repeats)
    return {"kv_cache": tokens_per_second(model, use_kv_cache=True, **args),
            "no_kv_cache": tokens_per_second(model, use_kv_cache=False, **args),
            "int8_kv_cache": tokens_per_second(quantize_int8(model), use_kv_cache=True, **args)}



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
        run_evaluate(b, Path(checkpoint), data, "generation_eval_fp32")
    int8 = run_evaluate(b, Path(checkpoint), data, "generation_eval_int8", quantize="int8")
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

