"""The LLaMA model in plain PyTorch, in the style of Meta's llama/model.py and nanoGPT.

Pre-norm decoder-only transformer: RMSNorm, rotary position embeddings (Meta's interleaved complex layout),
grouped-query attention without biases, SwiGLU feed-forward. Parameter names follow Meta's checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    dim: int = 256  # width of the residual stream
    n_layers: int = 4  # number of transformer blocks
    n_heads: int = 8  # query heads per attention layer
    n_kv_heads: Optional[int] = None  # key/value heads (grouped-query attention); None means n_heads
    vocab_size: int = 4096  # rows of the token-embedding table and the output head
    multiple_of: int = 32  # feed-forward hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None  # scales the feed-forward hidden size (Llama 2 70B: 1.3)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base period
    max_seq_len: int = 256  # longest sequence (prompt plus generated tokens) the model accepts
    tie_embeddings: bool = False  # share the token-embedding table with the output head
    init_std: float = 0.02  # standard deviation of the normal weight initialisation

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def validate(self) -> "ModelConfig":
        """Raise ValueError naming the first inconsistent field; return self so calls can be chained."""
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)!r}")
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            raise ValueError(f"model.ffn_dim_multiplier must be positive or null, got {self.ffn_dim_multiplier!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"model.dim / model.n_heads = {self.head_dim} must be even for rotary embeddings")
        kv = self.kv_heads
        if not isinstance(kv, int) or isinstance(kv, bool) or kv <= 0 or self.n_heads % kv:
            raise ValueError(f"model.n_kv_heads ({kv!r}) must be a positive divisor of model.n_heads ({self.n_heads})")
        return self


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float] = None) -> int:
    """Meta's rule: 2/3 of 4*dim (SwiGLU has three matrices, so this keeps the parameter count of a 4*dim MLP),
    optionally scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@torch.no_grad()
def init_fp32_(param: torch.Tensor, init, **kwargs) -> None:
    """Apply the random initialiser `init` (an nn.init function) to `param` through an fp32 tensor of its shape:
    the same draws from the generator, the same values up to rounding, in any dtype (one tensor's fp32 copy at
    a time, never the whole model's)."""
    if param.dtype == torch.float32 or param.is_meta:
        init(param, **kwargs)
        return
    value = torch.empty(param.shape, dtype=torch.float32, device=param.device)
    init(value, **kwargs)
    param.copy_(value)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16 autocast: the mean of squares loses too much precision otherwise.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cos_sin(head_dim: int, positions: torch.Tensor,
                 theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE angles pos * theta^(-2k/head_dim), each of shape positions.shape + (head_dim // 2,).

    Meta's precompute_freqs_cis(dim, end, theta) is torch.polar(1, angles) of positions = torch.arange(end), the
    same fp32 products. Taking positions lets every row of a left-padded batch start at position 0, and keeps
    the model free of buffers (nothing to re-initialise after building on the meta device); computing them in
    each forward is negligible next to the matmuls.
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device)[: head_dim // 2].float() / head_dim
    angles = positions.float().unsqueeze(-1) * (1.0 / (theta ** exponents))
    return angles.cos(), angles.sin()


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each pair (x[2k], x[2k+1]) of every head by its angle: Meta's interleaved layout.

    This is Meta's view_as_complex(x) * freqs_cis written in real arithmetic, because Inductor generates no
    code for complex ops (torch.compile would fall back to eager kernels). Computed in fp32 like Meta's.
    xq: [B, T, Hq, D], xk: [B, T, Hkv, D], cos/sin: [T, D/2] or [B, T, D/2].
    """
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads

    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = x.float().unflatten(-1, (-1, 2))
        real, imag = pairs[..., 0], pairs[..., 1]
        return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2).type_as(x)

    return rotate(xq), rotate(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, S, Hkv, D] -> [B, S, Hkv * n_rep, D]: each key/value head serves n_rep consecutive query heads."""
    if n_rep == 1:
        return x
    B, S, H, D = x.shape
    return x[:, :, :, None, :].expand(B, S, H, n_rep, D).reshape(B, S, H * n_rep, D)


class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding: [B, max_seq_len, Hkv, D]."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, device, dtype):
        shape = (batch_size, max_seq_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, start_pos: int, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store xk/xv at slots [start_pos, start_pos + T) and return keys/values of slots [0, start_pos + T)."""
        B, T = xk.shape[:2]
        end = start_pos + T
        if B > self.k.shape[0] or end > self.k.shape[1]:
            raise ValueError(f"KV cache holds {tuple(self.k.shape[:2])} (batch, positions); "
                             f"got batch {B} at positions [{start_pos}, {end})")
        self.k[:B, start_pos:end] = xk
        self.v[:B, start_pos:end] = xv
        return self.k[:B, :end], self.v[:B, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.n_rep = self.n_heads // self.n_kv_heads
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        self.cache: Optional[KVCache] = None

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], mask: Optional[torch.Tensor],
                start_pos: int) -> torch.Tensor:
        B, T, _ = x.shape
        xq = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        xk = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, *rope)
        decoding = self.cache is not None
        if decoding:
            # SDPA shares each cached key/value head among its query heads itself (enable_gqa): copying the
            # whole cache n_rep times cost ~8% of a decoding step. Training keeps the explicit copy, which
            # every SDPA backend accepts.
            xk, xv = self.cache.update(start_pos, xk, xv)
        else:
            xk, xv = repeat_kv(xk, self.n_rep), repeat_kv(xv, self.n_rep)
        q, k, v = (t.transpose(1, 2) for t in (xq, xk, xv))
        # mask None means plain causal attention over these T tokens, which lets SDPA pick its fused kernels.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=decoding and self.n_rep > 1)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden_dim)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], mask: Optional[torch.Tensor],
                start_pos: int) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


def attention_mask(start_pos: int, seq_len: int, n_keys: int, key_padding_mask: Optional[torch.Tensor],
                   device) -> torch.Tensor:
    """Boolean mask (True = attend) of queries at slots start_pos + [0, seq_len) over the last n_keys slots.

    Causal by slot; padded keys are hidden, except a padded query still sees itself so its softmax has at
    least one entry: some SDPA kernels return NaN for an all-masked row, and NaN in a padded slot's keys or
    values would reach real rows through their zero attention weights (0 * NaN = NaN).
    """
    q_slot = torch.arange(start_pos, start_pos + seq_len, device=device)[:, None]
    k_slot = torch.arange(start_pos + seq_len - n_keys, start_pos + seq_len, device=device)[None, :]
    mask = k_slot <= q_slot  # [T, S]
    if key_padding_mask is None:
        return mask
    visible = key_padding_mask[:, None, -n_keys:] | (k_slot == q_slot)  # [B, T, S]
    return (mask & visible)[:, None]  # [B, 1, T, S], broadcast over heads


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        """Built on the meta device, then allocated on the default device (a `with torch.device(...)` block's, or
        the CPU) and initialised once, by init_weights: the layers' own default initialisation never runs, so
        `torch.manual_seed(s); Transformer(cfg)` draws exactly what init_weights() draws after torch.manual_seed(s)
        on a model built on the meta device and allocated later (as training builds it)."""
        super().__init__()
        self.cfg = cfg.validate()
        self.activation_checkpointing = False
        device = torch.get_default_device()
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        if device.type != "meta":
            self.materialise(device).init_weights()

    def tie_weights(self) -> None:
        """Share the token-embedding table with the output head (cfg.tie_embeddings)."""
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def materialise(self, device, dtype: Optional[torch.dtype] = None) -> "Transformer":
        """Allocate storage, uninitialised, for a model built on the meta device: on `device`, in `dtype` (default:
        as built). to_empty() gives every parameter storage of its own, so tied weights are tied again."""
        if dtype is not None:
            self.to(dtype=dtype)
        self.to_empty(device=device)
        self.tie_weights()
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) matrices, RMSNorm weights 1. Call again after to_empty() of a meta-device model.

        The residual output projections (attention.wo, feed_forward.w2) get std / sqrt(2 * n_layers), as in
        GPT-2 and nanoGPT: each of the 2 * n_layers blocks adds to the residual stream, so this keeps its
        variance at the output about the same whatever the depth, and deep models start training stably.
        Values are drawn in fp32 whatever the weights' dtype, so bf16 weights are the fp32 ones rounded.
        """
        for name, p in self.named_parameters():
            self.init_parameter(name, p)

    @torch.no_grad()
    def init_parameter(self, name: str, value: torch.Tensor) -> None:
        """Initialise `value`, a tensor of the shape of parameter `name` (the parameter itself, or a copy of it
        that ZeRO stage 3 keeps a slice of), drawing from the default generator as init_weights does."""
        std = self.cfg.init_std
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            init_fp32_(value, nn.init.normal_, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layers))
        elif value.ndim == 2:
            init_fp32_(value, nn.init.normal_, mean=0.0, std=std)
        else:
            nn.init.ones_(value)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block in the backward pass instead of storing its activations (less memory, ~1/3
        more compute)."""
        self.activation_checkpointing = bool(enabled)

    def compile_blocks(self, **options) -> None:
        """torch.compile each block on its own (in place: parameter names do not change); `options` go to
        torch.compile.

        Compiling the whole model would make its backward one fused function that hands every gradient over
        at its end, so a data-parallel optimizer's per-parameter hooks (Horovod's allreduce) would all fire
        after backward, with no overlap of communication and compute. Per block, each block's gradients are
        ready, and sent, while the blocks before it are still in backward.
        """
        for layer in self.layers:
            layer.compile(**options)

    def enable_kv_cache(self, batch_size: int, max_seq_len: Optional[int] = None, device=None, dtype=None) -> None:
        """Allocate a fresh KV cache per layer (default: cfg.max_seq_len slots, the weights' device and dtype)."""
        max_seq_len = max_seq_len or self.cfg.max_seq_len
        if max_seq_len > self.cfg.max_seq_len:
            raise ValueError(f"KV cache of {max_seq_len} positions exceeds model.max_seq_len {self.cfg.max_seq_len}")
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, max_seq_len, self.cfg.kv_heads, self.cfg.head_dim,
                                            device or weight.device, dtype or weight.dtype)

    def disable_kv_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    @property
    def kv_cache_enabled(self) -> bool:
        return self.layers[0].attention.cache is not None

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, positions: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, T] -> fp32 logits [B, T, vocab_size]: self.output of hidden(); the arguments are hidden()'s."""
        return self.output(self.hidden(tokens, start_pos, positions, key_padding_mask)).float()

    def hidden(self, tokens: torch.Tensor, start_pos: int = 0, positions: Optional[torch.Tensor] = None,
               key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, T] -> the final normed hidden states [B, T, dim], what the output head projects to logits
        (a loss can project them a chunk at a time instead of holding every position's logits at once).

        start_pos: slot of tokens[:, 0]. With the KV cache enabled, the tokens are written to cache slots
            [start_pos, start_pos + T) and attend to every cached slot before them (prefill with start_pos=0,
            then feed each new token with start_pos = number of slots filled so far).
        positions: optional LongTensor [B, T], the RoPE position of each token; default start_pos + arange(T)
            for every row. RoPE scores depend only on position differences, so with key_padding_mask a
            left-padded row already equals its prompt alone up to float rounding; positions counted from each
            row's first real token, (key_padding_mask.cumsum(1) - 1).clamp(min=0), also reproduce its angles.
        key_padding_mask: optional BoolTensor [B, start_pos + T], True for real tokens and False for padding,
            covering every slot from 0; padded slots are never attended to. Without the cache only its last T
            columns are used.
        """
        B, T = tokens.shape
        end = start_pos + T
        if end > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {end} exceed model.max_seq_len {self.cfg.max_seq_len}")
        if positions is None:
            positions = torch.arange(start_pos, end, device=tokens.device)
        elif positions.shape != tokens.shape:
            raise ValueError(f"positions must have shape {tuple(tokens.shape)}, got {tuple(positions.shape)}")
        if key_padding_mask is not None and key_padding_mask.shape != (B, end):
            raise ValueError(f"key_padding_mask must have shape {(B, end)}, got {tuple(key_padding_mask.shape)}")
        rope = rope_cos_sin(self.cfg.head_dim, positions, self.cfg.rope_theta)
        mask = None
        if self.kv_cache_enabled or key_padding_mask is not None:
            n_keys = end if self.kv_cache_enabled else T
            mask = attention_mask(start_pos, T, n_keys, key_padding_mask, tokens.device)

        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, rope, mask, start_pos, use_reentrant=False)
            else:
                h = layer(h, rope, mask, start_pos)
        return self.norm(h)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Number of parameters (a tied matrix counted once). exclude_embedding leaves out the token-embedding
        table, a lookup rather than a matmul, unless it is tied to the output head (then it is a matmul too)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and not self.cfg.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at sequence length seq_len: 6 * N + 12 * L * dim * T.

        N counts the parameters used in matmuls (all but an untied token-embedding table): each costs 2 FLOPs
        per token forward and 4 backward. 12 * L * dim * T is attention's QK^T and AV (2 matmuls of
        2 * dim * T FLOPs each per layer, times 3 for forward + backward). PaLM appendix B; nanoGPT estimate_mfu.
        """
        return 6 * self.num_params(exclude_embedding=True) + 12 * self.cfg.n_layers * self.cfg.dim * seq_len
