"""Sampling and incremental decoding: continue token prompts with a model, using its KV cache.

The prompts are run once (prefill), then each new token is a one-token forward pass that attends to the
cached keys and values. Prompts of different lengths share a batch by left padding: a key mask hides the
padding and each row's rotary positions count from its first real token, so a padded row decodes exactly as
that prompt would alone.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from hvd_llama.cli import UserError

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

