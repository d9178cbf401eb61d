"""Sample text from a trained model: `python -m hvd_llama.generate --checkpoint runs/x --prompt "def "`.

Decoding (decoding.py) uses the model's KV cache, and prompts of different lengths share a batch by left
padding, each row decoding exactly as its prompt would alone. One process; Horovod is not involved.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from hvd_llama.cli import UserError, run_main
from hvd_llama.device import resolve_device
from hvd_llama.tokenizer import Tokenizer
from hvd_llama.use.decoding import check_context, check_sampling, generate
from hvd_llama.use.inference import (
    DTYPES,
    QUANTIZE_CHOICES,
    check_dtype,
    layout_for_decoding,
    load_model,
    require_tokenizer,
)

DEFAULT_MAX_NEW_TOKENS = 200


class StreamPrinter:
    """Prints a row's text as its tokens arrive. Text is decoded from the start each time (a piece's
    spelling can depend on its neighbours), and an incomplete UTF-8 character is held back."""

    def __init__(self, tokenizer: Tokenizer, prompt: Sequence[int], out=sys.stdout):
        self.tokenizer, self.ids, self.out = tokenizer, list(prompt), out
        self.printed = len(tokenizer.decode(self.ids))

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        if len(text) > self.printed:
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


@dataclass
class GenerateConfig:
    """The generate command's options: parse_args reads them from the flags (whose defaults these are)."""
    checkpoint: str  # checkpoint folder, run folder (newest checkpoint) or Hugging Face LLaMA folder
    prompt: list[str] = field(default_factory=list)  # prompt texts (with prompt_file's: a batch)
    prompt_file: list[str] = field(default_factory=list)  # files whose whole content is one prompt each
    max_new_tokens: Optional[int] = None  # per sample; None: DEFAULT_MAX_NEW_TOKENS, or what fits in the context
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 200  # sample from the k most likely tokens; 0 = all
    top_p: float = 1.0  # nucleus sampling mass in (0, 1]; 1 = off
    seed: int = 1337  # the same seed gives the same samples
    num_samples: int = 1  # samples per prompt
    stream: bool = False  # print tokens as they are generated (one sample)
    no_kv_cache: bool = False  # recompute the whole sequence for every token
    quantize: Optional[str] = None  # int8: dynamic int8 Linear layers (CPU); None: none
    dtype: str = "fp32"  # the weights' type, a key of inference.DTYPES
    device: str = "auto"  # auto | cpu | cuda

    def validate(self) -> None:
        """What argparse cannot check, each as one line naming the flag; before any checkpoint is read."""
        check_sampling(self.temperature, self.top_k, self.top_p)
        check_dtype(self.dtype, self.quantize)
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if self.num_samples < 1:
            raise UserError(f"--num-samples {self.num_samples} must be at least 1")
        missing = [name for name in self.prompt_file if not Path(name).is_file()]
        if missing:
            raise UserError(f"--prompt-file {missing[0]} does not exist")
        if not self.prompt and not self.prompt_file:
            raise UserError("give at least one --prompt TEXT or --prompt-file FILE")
        if self.stream and (len(self.prompt) + len(self.prompt_file)) * self.num_samples > 1:
            raise UserError("--stream prints one sample: give one prompt and --num-samples 1")


def parse_args(argv: Optional[Sequence[str]]) -> GenerateConfig:
    parser = argparse.ArgumentParser(
        prog="python -m hvd_llama.generate", description=__doc__.split("\n\n")[0],
        argument_default=argparse.SUPPRESS,  # a flag left out is not set: the config dataclass's default holds
        epilog="Example: python -m hvd_llama.generate --checkpoint runs/tiny --prompt 'def main(' --stream")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder, run folder (newest checkpoint) or Hugging Face LLaMA folder")
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable: a batch)")
    parser.add_argument("--prompt-file", action="append", metavar="FILE",
                        help="a file whose whole content is one prompt (repeatable)")
    parser.add_argument("--max-new-tokens", type=int,
                        help=f"tokens to generate per sample (default: {DEFAULT_MAX_NEW_TOKENS}, or what fits in "
                             "the context); stops earlier at EOS")
    parser.add_argument("--temperature", type=float, help="0 = greedy")
    parser.add_argument("--top-k", type=int, help="sample from the k most likely tokens; 0 = all")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]; 1 = off")
    parser.add_argument("--seed", type=int, help="random seed; the same seed gives the same samples")
    parser.add_argument("--num-samples", type=int, help="samples per prompt")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated (one sample)")
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence for every token")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="dynamic int8 Linear layers (CPU)")
    parser.add_argument("--dtype", choices=tuple(DTYPES),
                        help="the weights' type: bf16 halves their memory (fast on GPUs, slow on most CPUs)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    cfg = GenerateConfig(**vars(parser.parse_args(argv)))
    cfg.validate()
    return cfg


def generate_samples(cfg: GenerateConfig) -> None:
    """Print cfg.num_samples continuations of each of cfg's prompts (streamed with cfg.stream), then the speed on
    stderr."""
    texts = cfg.prompt + [Path(name).read_text(encoding="utf-8") for name in cfg.prompt_file]
    device = resolve_device(cfg.device, "--device", cfg.quantize)
    model, tokenizer, _ = load_model(cfg.checkpoint, device, cfg.quantize, cfg.dtype)
    if not cfg.quantize:
        layout_for_decoding(model)
    tokenizer = require_tokenizer(tokenizer, cfg.checkpoint)
    prompts = [tokenizer.encode(t, bos=True) for t in texts for _ in range(cfg.num_samples)]
    max_new = cfg.max_new_tokens
    if max_new is None:  # the default shrinks to fit the context; an explicit value must fit
        max_new = max(1, min(DEFAULT_MAX_NEW_TOKENS, model.cfg.max_seq_len - max(len(p) for p in prompts)))
    check_context([len(p) for p in prompts], max_new, model.cfg.max_seq_len)

    streamer = StreamPrinter(tokenizer, prompts[0]) if cfg.stream else None
    if streamer:
        print(texts[0], end="", flush=True)
    start = time.perf_counter()
    outputs = generate(model, prompts, max_new, cfg.temperature, cfg.top_k, cfg.top_p,
                       eos_id=tokenizer.eos_id, generator=torch.Generator(device).manual_seed(cfg.seed),
                       use_kv_cache=not cfg.no_kv_cache, on_token=streamer)
    seconds = time.perf_counter() - start
    if streamer:
        print(flush=True)
    else:
        for i, (prompt, new) in enumerate(zip(prompts, outputs)):
            if len(outputs) > 1:
                print(f"--- sample {i % cfg.num_samples + 1} of prompt {i // cfg.num_samples + 1} ---")
            print(tokenizer.decode(prompt + new), flush=True)
    n_new = sum(len(o) for o in outputs)
    print(f"generated {n_new} tokens in {len(outputs)} sample(s), {seconds:.2f} s ({n_new / seconds:.1f} tok/s) | "
          f"{'no KV cache' if cfg.no_kv_cache else 'KV cache'} | {cfg.quantize or cfg.dtype} | {device.type}",
          file=sys.stderr, flush=True)


def _main(argv: Optional[Sequence[str]]) -> None:
    generate_samples(parse_args(argv))


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(_main, argv)


if __name__ == "__main__":
    main()
