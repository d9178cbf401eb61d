"""Sample text from a trained model: `python -m hvd_llama.generate --checkpoint runs/x --prompt "def "`.

Incremental decoding with the model's KV cache: the prompts are run once (prefill), then each new token is a
one-token forward pass that attends to the cached keys and values. Prompts of different lengths share a batch
by left padding: a key mask hides the padding and each row's rotary positions count from its first real
token, so a padded row decodes exactly as that prompt would alone.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from hvd_llama import checkpoint
from hvd_llama.cli import UserError, best_seconds, run_main
from hvd_llama.convert import check_tensors
from hvd_llama.pretrained import is_foreign_folder, load_weights
from hvd_llama.model import Transformer
from hvd_llama.tokenizer import Tokenizer

QUANTIZE_CHOICES = ("int8",)
DEFAULT_MAX_NEW_TOKENS = 200


# ------------------------------------------------------------------------------------------------ loading

def resolve_device(name: str, quantize: Optional[str]) -> torch.device:
    if quantize and name == "cuda":
        raise UserError("--quantize int8 is dynamic quantization for CPU inference; use --device cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA device (use --device cpu or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() and not quantize else "cpu"
    return torch.device(name)


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` with every nn.Linear replaced by a dynamically quantized int8 one (CPU only).

    Weights are stored as int8 with one scale per tensor; activations are quantized on the fly per batch,
    so no calibration data is needed. Embeddings and norms stay fp32.
    """
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; the API still works, and the warnings would
        # otherwise be the first thing every int8 run prints.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def layout_for_decoding(model: nn.Module) -> nn.Module:
    """Store every CPU Linear weight with its longer dimension contiguous; values unchanged, in place.

    Decoding one token at a time is a matrix-vector product per Linear, bound by how fast its weight streams
    from memory. MKL's fp32 GEMV here (2-core AMD EPYC) streams a row-major [out, in] weight with out > in at
    ~8.5 GB/s but the same matrix stored column-major at ~18 GB/s, and the reverse for out < in: this cut a
    decoding step of `small` by ~12%. Batched forwards are compute-bound and about as fast either way.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.device.type == "cpu":
            out_features, in_features = module.weight.shape
            if out_features > in_features:
                module.weight.data = module.weight.data.t().contiguous().t()
    return model


def load_model(path, device: torch.device = torch.device("cpu"),
               quantize: Optional[str] = None) -> tuple[nn.Module, Optional[Tokenizer], dict]:
    """(model in eval mode, its tokenizer or None, the checkpoint's config.yaml as a dict).

    `path` is anything pretrained.load_weights reads (hvd_llama checkpoint, run or checkpoints folder, LoRA
    adapters merged into their base, a Hugging Face or Meta folder; their config dict is {}). Raises UserError
    for anything unusable.
    """
    path = Path(path)
    state, model_cfg, tokenizer_path = load_weights(path)
    config = {} if is_foreign_folder(path) else checkpoint.read_config(checkpoint.resolve_checkpoint(path))
    try:
        model = Transformer(model_cfg)
    except ValueError as err:
        raise UserError(f"{path}: incompatible model configuration ({err})") from None
    check_tensors(state, {k: v.shape for k, v in model.state_dict().items()},
                  f"{path} (its model.pt does not fit its config.yaml)")
    model.load_state_dict(state)
    tokenizer = Tokenizer(tokenizer_path) if tokenizer_path is not None else None
    if tokenizer is not None and tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"{tokenizer_path} has {tokenizer.vocab_size} tokens but the model only "
                        f"{model_cfg.vocab_size}: the tokenizer does not belong to this checkpoint")
    model.eval()
    if quantize == "int8":
        model = quantize_int8(model)
    return model.to(device), tokenizer, config


def require_tokenizer(tokenizer: Optional[Tokenizer], path) -> Tokenizer:
    if tokenizer is None:
        raise UserError(f"checkpoint {path} has no tokenizer.model, so text cannot be encoded")
    return tokenizer


# ----------------------------------------------------------------------------------------------- sampling

def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature >= 0:
        raise UserError(f"temperature {temperature} must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise UserError(f"top-k {top_k} must be >= 0 (0 = no top-k filter)")
    if not 0 < top_p <= 1:
        raise UserError(f"top-p {top_p} must be in (0, 1] (1 = no nucleus filter)")


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th included), -inf elsewhere."""
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # A token goes when the tokens ranked above it already hold p; the most likely token always stays.
    drop = probs.cumsum(-1) - probs >= p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token of each row from logits [B, vocab]: greedy at temperature 0, else a draw from the
    temperature-scaled distribution after the top-k and top-p filters."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        logits = filter_top_k(logits, top_k)
    if top_p < 1:
        logits = filter_top_p(logits, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------- decoding

def check_context(prompt_lengths: Sequence[int], max_new_tokens: int, max_seq_len: int) -> None:
    longest = max(prompt_lengths)
    if longest + max_new_tokens > max_seq_len:
        raise UserError(f"the prompt of {longest} tokens plus max-new-tokens {max_new_tokens} exceeds the model's "
                        f"context of {max_seq_len} tokens; shorten the prompt or use --max-new-tokens "
                        f"{max(max_seq_len - longest, 0)} or less")


def left_pad(prompts: Sequence[Sequence[int]], total_len: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(tokens [B, total_len], real-token mask [B, total_len], prompt width P): prompts right-aligned at P;
    slots after P are for generated tokens and count as real."""
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), total_len, dtype=torch.long, device=device)
    mask = torch.ones(len(prompts), total_len, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        pad = width - len(prompt)
        tokens[row, pad:width] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, :pad] = False
    return tokens, mask, width


@torch.no_grad()
def generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, use_kv_cache: bool = True,
             on_token: Optional[Callable[[int, int], None]] = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to max_new_tokens tokens; returns the new tokens of
    each row, stopping after its EOS (not included). on_token(row, token) is called as each token appears.

    use_kv_cache=False recomputes the whole sequence for every token (the reference, and the benchmark's
    baseline). A fixed `generator` seed reproduces the samples of a given batch.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token")
    check_sampling(temperature, top_k, top_p)
    check_context([len(p) for p in prompts], max_new_tokens, model.cfg.max_seq_len)
    device = model.tok_embeddings.weight.device
    total_len = max(len(p) for p in prompts) + max_new_tokens
    tokens, mask, width = left_pad(prompts, total_len, device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # each row counts from its first real token
    key_mask = None if bool(mask.all()) else mask  # no padding: plain causal attention (fused SDPA kernels)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    if use_kv_cache:
        # A quantized model's Linear weights are packed int8, so name the cache's device and dtype explicitly.
        model.enable_kv_cache(len(prompts), total_len, device=device, dtype=model.tok_embeddings.weight.dtype)
    try:
        start = 0  # first slot fed to the model: the whole prompt now, then only the newest token if cached
        for cur in range(width, total_len):  # cur: the slot the next token goes to
            logits = model(tokens[:, start:cur], start, positions[:, start:cur],
                           None if key_mask is None else key_mask[:, :cur])[:, -1]
            next_tokens = sample_next(logits, temperature, top_k, top_p, generator)
            tokens[:, cur] = next_tokens
            for row, token in enumerate(next_tokens.tolist()):
                if finished[row]:
                    continue
                if token == eos_id:
                    finished[row] = True
                    continue
                outputs[row].append(token)
                if on_token is not None:
                    on_token(row, token)
            if all(finished):
                break
            start = cur if use_kv_cache else 0
    finally:
        if use_kv_cache:
            model.disable_kv_cache()
    return outputs


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


# ------------------------------------------------------------------------------------------------------ CLI

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


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hvd_llama.generate", description=__doc__.split("\n\n")[0],
        epilog="Example: python -m hvd_llama.generate --checkpoint runs/tiny --prompt 'def main(' --stream")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder, run folder (newest checkpoint) or Hugging Face LLaMA folder")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable: a batch)")
    parser.add_argument("--prompt-file", action="append", default=[], metavar="FILE",
                        help="a file whose whole content is one prompt (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"tokens to generate per sample (default: {DEFAULT_MAX_NEW_TOKENS}, or what fits in "
                             "the context); stops earlier at EOS")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=200, help="sample from the k most likely tokens; 0 = all")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 = off")
    parser.add_argument("--seed", type=int, default=1337, help="random seed; the same seed gives the same samples")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated (one sample)")
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence for every token")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="dynamic int8 Linear layers (CPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    for name in args.prompt_file:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"--prompt-file {name} does not exist")
        prompts.append(path.read_text(encoding="utf-8"))
    if not prompts:
        raise UserError("give at least one --prompt TEXT or --prompt-file FILE")
    return prompts


def check_args(args: argparse.Namespace) -> None:
    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.num_samples < 1:
        raise UserError(f"--num-samples {args.num_samples} must be at least 1")


def _main(argv: Optional[Sequence[str]]) -> None:
    args = parse_args(argv)
    check_args(args)
    texts = read_prompts(args)
    if args.stream and len(texts) * args.num_samples > 1:
        raise UserError("--stream prints one sample: give one prompt and --num-samples 1")
    device = resolve_device(args.device, args.quantize)
    model, tokenizer, _ = load_model(args.checkpoint, device, args.quantize)
    if not args.quantize:
        layout_for_decoding(model)
    tokenizer = require_tokenizer(tokenizer, args.checkpoint)
    prompts = [tokenizer.encode(t, bos=True) for t in texts for _ in range(args.num_samples)]
    max_new = args.max_new_tokens
    if max_new is None:  # the default shrinks to fit the context; an explicit value must fit
        max_new = max(1, min(DEFAULT_MAX_NEW_TOKENS, model.cfg.max_seq_len - max(len(p) for p in prompts)))
    check_context([len(p) for p in prompts], max_new, model.cfg.max_seq_len)

    streamer = StreamPrinter(tokenizer, prompts[0]) if args.stream else None
    if streamer:
        print(texts[0], end="", flush=True)
    start = time.perf_counter()
    outputs = generate(model, prompts, max_new, args.temperature, args.top_k, args.top_p,
                       eos_id=tokenizer.eos_id, generator=torch.Generator(device).manual_seed(args.seed),
                       use_kv_cache=not args.no_kv_cache, on_token=streamer)
    seconds = time.perf_counter() - start
    if streamer:
        print(flush=True)
    else:
        for i, (prompt, new) in enumerate(zip(prompts, outputs)):
            if len(outputs) > 1:
                print(f"--- sample {i % args.num_samples + 1} of prompt {i // args.num_samples + 1} ---")
            print(tokenizer.decode(prompt + new), flush=True)
    n_new = sum(len(o) for o in outputs)
    print(f"generated {n_new} tokens in {len(outputs)} sample(s), {seconds:.2f} s ({n_new / seconds:.1f} tok/s) | "
          f"{'no KV cache' if args.no_kv_cache else 'KV cache'} | {args.quantize or 'fp32'} | {device.type}",
          file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(_main, argv)


if __name__ == "__main__":
    main()
