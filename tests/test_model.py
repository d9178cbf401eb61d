import math
from dataclasses import replace

import pytest
import torch
import yaml
from support import REPO
from support.models import MICRO, TINY, tiny_model, tokens

from hvd_llama.model import ModelConfig, Transformer, apply_rotary_emb, ffn_hidden_dim, rope_cos_sin

CONFIGS = REPO / "configs"


def test_shapes_names_and_no_buffers():
    model = tiny_model()
    logits = model(tokens(3, 10))
    assert logits.shape == (3, 10, TINY.vocab_size) and logits.dtype == torch.float32
    keys = set(model.state_dict())
    assert {"tok_embeddings.weight", "norm.weight", "output.weight", "layers.1.attention.wq.weight",
            "layers.1.attention.wk.weight", "layers.1.attention.wv.weight", "layers.1.attention.wo.weight",
            "layers.1.feed_forward.w1.weight", "layers.1.feed_forward.w2.weight", "layers.1.feed_forward.w3.weight",
            "layers.1.attention_norm.weight", "layers.1.ffn_norm.weight"} <= keys
    assert len(keys) == 3 + 9 * TINY.n_layers
    assert list(model.buffers()) == []
    assert model.layers[0].attention.wk.weight.shape == (2 * 16, 64)  # 2 kv heads of head_dim 16
    assert model.layers[0].feed_forward.w1.weight.shape == (ffn_hidden_dim(64, 16), 64) == (176, 64)


def test_causal():
    model = tiny_model()
    x = tokens(2, 12)
    t = 7
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % TINY.vocab_size
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 1e-4  # every later position sees the change


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = tiny_model()
    mha = tiny_model(n_kv_heads=None)
    state = gqa.state_dict()
    n_rep, head_dim = TINY.n_heads // TINY.kv_heads, TINY.head_dim
    for key in list(state):
        if key.endswith(("attention.wk.weight", "attention.wv.weight")):
            heads = state[key].view(TINY.kv_heads, head_dim, TINY.dim)
            state[key] = heads.repeat_interleave(n_rep, dim=0).reshape(-1, TINY.dim)  # kv head h serves q heads
    mha.load_state_dict(state)
    x = tokens(2, 16)
    torch.testing.assert_close(mha(x), gqa(x), rtol=0, atol=1e-5)
    explicit = tiny_model(n_kv_heads=TINY.n_heads)
    assert set(explicit.state_dict()) == set(mha.state_dict())
    explicit.load_state_dict(mha.state_dict())
    torch.testing.assert_close(explicit(x), mha(x), rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 3, 2, 1]])
def test_kv_cache_matches_full_forward(chunks):
    model = tiny_model()
    x = tokens(2, sum(chunks))
    full = model(x)
    model.enable_kv_cache(batch_size=2)
    pieces, pos = [], 0
    for n in chunks:
        pieces.append(model(x[:, pos:pos + n], start_pos=pos))
        pos += n
    model.disable_kv_cache()
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(x), full, rtol=0, atol=0)  # disabled again: a plain forward


@torch.no_grad()
def test_batched_left_padded_prompts_match_one_by_one():
    """What a generator does: left-pad, per-row positions, key padding mask, then decode with the cache."""
    model = tiny_model()
    prompts = [tokens(1, n, seed=n)[0] for n in (3, 7, 5)]
    steps = 4
    width = max(len(p) for p in prompts)

    def greedy_alone(prompt):
        model.enable_kv_cache(batch_size=1)
        logits = [model(prompt[None])[:, -1]]
        pos = len(prompt)
        for _ in range(steps):
            logits.append(model(logits[-1].argmax(-1, keepdim=True), start_pos=pos)[:, -1])
            pos += 1
        return torch.cat(logits)

    expected = torch.stack([greedy_alone(p) for p in prompts])

    batch = torch.zeros(len(prompts), width, dtype=torch.long)  # pad id 0 is a real token: the mask must hide it
    real = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):], real[i, width - len(p):] = p, True
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    model.enable_kv_cache(batch_size=len(prompts))
    logits = [model(batch, positions=positions, key_padding_mask=real)[:, -1]]
    next_pos = positions[:, -1:] + 1
    for step in range(steps):
        real = torch.cat([real, torch.ones(len(prompts), 1, dtype=torch.bool)], 1)
        out = model(logits[-1].argmax(-1, keepdim=True), start_pos=width + step, positions=next_pos,
                    key_padding_mask=real)
        logits.append(out[:, -1])
        next_pos = next_pos + 1
    model.disable_kv_cache()
    torch.testing.assert_close(torch.stack(logits, 1), expected, rtol=0, atol=1e-5)
    assert torch.isfinite(torch.stack(logits)).all()


@torch.no_grad()
def test_left_padded_batch_without_cache_matches_unpadded():
    model = tiny_model()
    prompt = tokens(1, 6)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], 1)
    real = torch.tensor([[False] * 3 + [True] * 6])
    out = model(padded, positions=(real.long().cumsum(1) - 1).clamp(min=0), key_padding_mask=real)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 3:], model(prompt), rtol=0, atol=1e-5)


@torch.no_grad()
def test_positions_reach_the_rotary_embedding():
    model = tiny_model()
    x = tokens(2, 6)
    shifted = model(x, positions=torch.arange(6).expand(2, 6) + 9)
    torch.testing.assert_close(shifted, model(x), rtol=0, atol=1e-5)  # RoPE is relative: a shift changes nothing
    gap = model(x, positions=torch.tensor([0, 1, 2, 10, 11, 12]).expand(2, 6))
    torch.testing.assert_close(gap[:, :3], model(x)[:, :3], rtol=0, atol=1e-5)
    assert (gap[:, 3:] - model(x)[:, 3:]).abs().amax() > 1e-3


def test_rope_score_depends_only_on_offset():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(m, n):
        cos_q, sin_q = rope_cos_sin(32, torch.tensor([m]), theta=500.0)
        cos_k, sin_k = rope_cos_sin(32, torch.tensor([n]), theta=500.0)
        rq, _ = apply_rotary_emb(q, q, cos_q, sin_q)
        rk, _ = apply_rotary_emb(k, k, cos_k, sin_k)
        return (rq * rk).sum().item()

    assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-4)
    assert score(0, 7) == pytest.approx(score(30, 37), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-2)
    rq, _ = apply_rotary_emb(q, q, *rope_cos_sin(32, torch.tensor([9])))
    assert rq.norm().item() == pytest.approx(q.norm().item(), rel=1e-5)  # a rotation


def test_rope_matches_metas_complex_formula():
    head_dim, theta = 16, 10000.0
    torch.manual_seed(0)
    xq, xk = torch.randn(2, 5, 4, head_dim), torch.randn(2, 5, 2, head_dim)
    # Meta's llama/model.py: precompute_freqs_cis + apply_rotary_emb with complex numbers.
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: (head_dim // 2)].float() / head_dim))
    freqs_cis = torch.polar(torch.ones(5, head_dim // 2), torch.outer(torch.arange(5).float(), freqs))
    ref_q = torch.view_as_real(torch.view_as_complex(xq.reshape(2, 5, 4, -1, 2)) * freqs_cis[None, :, None]).flatten(3)
    ref_k = torch.view_as_real(torch.view_as_complex(xk.reshape(2, 5, 2, -1, 2)) * freqs_cis[None, :, None]).flatten(3)
    q, k = apply_rotary_emb(xq, xk, *rope_cos_sin(head_dim, torch.arange(5), theta))
    torch.testing.assert_close(q, ref_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(k, ref_k, rtol=0, atol=1e-6)


PRESET_PARAMS = {"llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320, "llama-33b": 32_528_943_616,
                 "llama-65b": 65_285_660_672, "llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320,
                 "llama2-70b": 68_976_648_192}


@pytest.mark.parametrize("name", sorted(PRESET_PARAMS))
def test_preset_parameter_counts_on_meta_device(name):
    preset = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    cfg = ModelConfig(**preset["model"])
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.output.weight.is_meta
    assert model.num_params() == PRESET_PARAMS[name]
    assert preset["train"]["seq_len"] == cfg.max_seq_len == (4096 if name.startswith("llama2") else 2048)
    assert preset["train"]["precision"] == "bf16"


def test_flops_per_token_hand_count():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=32)
    hidden = 192  # int(2 * 256 / 3) = 170, rounded up to a multiple of 32
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * hidden + 2 * 64  # wq+wo, wk+wv, w1-w3, two norms
    matmul_params = 2 * per_layer + 64 + 100 * 64  # final norm and output head; not the embedding table
    model = Transformer(cfg)
    assert model.num_params() == matmul_params + 100 * 64
    assert model.num_params(exclude_embedding=True) == matmul_params
    assert model.flops_per_token(128) == 6 * matmul_params + 12 * 2 * 64 * 128
    tied = Transformer(replace(cfg, tie_embeddings=True))
    assert tied.num_params() == tied.num_params(exclude_embedding=True) == matmul_params
    assert tied.output.weight is tied.tok_embeddings.weight


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=256, n_layers=8, n_heads=4, vocab_size=1000, init_std=0.02)
    model = Transformer(cfg)
    layer = model.layers[3]
    assert layer.attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for proj in (layer.attention.wo, layer.feed_forward.w2):
        assert proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.equal(layer.attention_norm.weight, torch.ones(256))
    assert torch.equal(model.norm.weight, torch.ones(256))


def test_meta_device_then_materialize():
    with torch.device("meta"):
        model = Transformer(TINY)
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(tokens(1, 4))).all()
    assert torch.equal(model.norm.weight, torch.ones(TINY.dim))


def test_activation_checkpointing_gives_same_gradients():
    x = tokens(2, 16)

    def grads(enabled):
        model = tiny_model().train()
        model.set_activation_checkpointing(enabled)
        calls = []
        model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        assert len(calls) == (2 if enabled else 1)  # checkpointing recomputes the block during backward
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_a, plain = grads(False)
    loss_b, ckpt = grads(True)
    assert torch.equal(loss_a, loss_b)
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("changes, message", [
    ({"dim": 65}, "divisible by model.n_heads"),
    ({"dim": 24, "n_heads": 8}, "must be even"),
    ({"n_kv_heads": 3}, "positive divisor of model.n_heads"),
    ({"n_kv_heads": 0}, "positive divisor"),
    ({"n_layers": 0}, "model.n_layers must be a positive integer"),
    ({"vocab_size": 10.5}, "model.vocab_size must be a positive integer"),
    ({"norm_eps": 0.0}, "model.norm_eps must be positive"),
    ({"rope_theta": -1.0}, "model.rope_theta must be positive"),
    ({"ffn_dim_multiplier": 0.0}, "model.ffn_dim_multiplier"),
])
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        Transformer(replace(TINY, **changes))


def test_forward_rejects_out_of_range_positions():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 4), start_pos=TINY.max_seq_len - 2)
    model.enable_kv_cache(batch_size=1, max_seq_len=8)
    with pytest.raises(ValueError, match="KV cache"):
        model(tokens(1, 9))
    with pytest.raises(ValueError, match="KV cache"):
        model(tokens(2, 3))


@torch.no_grad()
@pytest.mark.slow  # ~7 s with a warm Inductor cache, 20+ s cold on 2 cores
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # raised inside torch's Inductor
def test_torch_compile_matches_eager():
    model = tiny_model()
    x = tokens(2, 16)
    torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=0, atol=1e-5)


class MarkedBlock(torch.nn.Module):
    """A block, run as it is (compiled or not), that records when backward reaches its output: the moment just
    before its own backward starts."""

    def __init__(self, block, index: int, events: list):
        super().__init__()
        self.block, self.index, self.events = block, index, events

    @property
    def attention(self):  # Transformer reads the KV cache state from its first layer's attention
        return self.block.attention

    def forward(self, x, *args):
        out = self.block(x, *args)
        out.register_hook(lambda grad: self.events.append(("backward reaches block", self.index)))
        return out


def test_per_block_compile_keeps_gradients_ready_block_by_block():
    """Horovod's DistributedOptimizer allreduces each gradient from a hook run when it is accumulated. Per-block
    compile must keep those hooks firing block by block. The aot_eager backend builds the same autograd structure
    as Inductor (one autograd function per compiled region; Inductor only generates the kernels inside) in
    seconds instead of a minute on this CPU; a GPU node runs Inductor itself (launch/gpu_check.sh)."""
    model, eager, events = tiny_model(MICRO), tiny_model(MICRO), []
    n_layers = len(model.layers)
    model.compile_blocks(backend="aot_eager")
    assert all(layer._compiled_call_impl is not None for layer in model.layers)  # each block compiled on its own
    assert [name for name, _ in model.named_parameters()] == [name for name, _ in eager.named_parameters()]
    for index, layer in enumerate(model.layers):
        for name, param in layer.named_parameters():
            param.register_post_accumulate_grad_hook(lambda p, index=index: events.append(("grad ready", index)))
        model.layers[index] = MarkedBlock(layer, index, events)
    x = tokens(2, 16, seed=3, vocab=MICRO.vocab_size)
    logits = model(x)
    torch.testing.assert_close(logits, eager(x), rtol=1e-5, atol=1e-5)
    logits.square().mean().backward()
    # Backward reaches the last block, all its gradients are ready, then it reaches the block before, and so on.
    params_per_block = len(list(eager.layers[0].parameters()))
    expected = [event for index in reversed(range(n_layers))
                for event in [("backward reaches block", index)] + [("grad ready", index)] * params_per_block]
    assert events == expected
