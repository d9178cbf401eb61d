"""Models small enough to run in the test process, their weights and token batches the same on every call."""
from dataclasses import replace

import torch

from hvd_llama.model import ModelConfig, Transformer

# Grouped-query attention (4 query heads, 2 key/value heads), an odd vocabulary, and a larger init than 0.02 so
# attention patterns and logits differ clearly between positions.
TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=32,
                   init_std=0.1)
# The shape support.trainrun.micro_overrides trains (vocabulary 512, context 64).
MICRO = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=64)


def tiny_model(config: ModelConfig = TINY, seed: int = 0, **changes) -> Transformer:
    """A model of `config` with `changes`, its weights drawn after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return Transformer(replace(config, **changes))


def tokens(batch: int, length: int, seed: int = 1, vocab: int = TINY.vocab_size) -> torch.Tensor:
    """A (batch, length) batch of token ids below `vocab`, drawn from a generator of its own."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
