"""LoRA adapters: parameter counts by hand, frozen base weights, exact merge, adapter-only state round trip."""
import math

import pytest
import torch
from support.models import tiny_model, tokens

from hvd_llama.config import LORA_TARGETS
from hvd_llama.lora import (
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_state_dict,
    merged_state_dict,
    trainable_param_count,
)
from hvd_llama.model import ModelConfig, Transformer

# Grouped-query attention (4 query heads, 2 key/value heads) so wk/wv are narrower than wq/wo.
CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=32)
RANK, ALPHA = 4, 8.0


def train_adapters(model, steps=5, lr=1e-2):
    """A few AdamW steps (with weight decay) on the trainable parameters only; returns the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    batch, losses = tokens(3, 17, seed=2, vocab=CFG.vocab_size), []
    for _ in range(steps):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_default_targets_count_matches_the_hand_count():
    model = tiny_model(CFG)
    names = apply_lora(model, RANK, ALPHA)
    assert names == [f"layers.{i}.attention.{w}" for i in range(2) for w in ("wq", "wv")]
    # per layer: wq 64 -> 64, wv 64 -> 2 kv heads * 16 = 32; rank * (in + out) each
    per_layer = RANK * (64 + 64) + RANK * (64 + 32)
    assert trainable_param_count(model) == 2 * per_layer == 1792
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{ab}" for name in names for ab in ("lora_A", "lora_B")}


def test_all_targets_count_matches_the_hand_count():
    model = tiny_model(CFG)
    names = apply_lora(model, RANK, ALPHA, targets=LORA_TARGETS)
    assert len(names) == 7 * CFG.n_layers + 1 and names[-1] == "output"
    hidden = CFG.ffn_hidden_dim
    assert hidden == 192  # 2/3 * 4 * 64 = 170, rounded up to a multiple of 32
    per_layer = RANK * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + hidden))
    expected = CFG.n_layers * per_layer + RANK * (64 + CFG.vocab_size)
    assert trainable_param_count(model) == expected
    w2_only = tiny_model(CFG)
    apply_lora(w2_only, 2, ALPHA, targets=("w2",))
    assert trainable_param_count(w2_only) == CFG.n_layers * 2 * (hidden + 64)


def test_adapting_keeps_base_keys_and_tensors_and_starts_from_the_base_model():
    model = tiny_model(CFG)
    base_keys = set(model.state_dict())
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    wq_storage = model.layers[0].attention.wq.weight.data_ptr()
    batch = tokens(3, 16, vocab=CFG.vocab_size)
    with torch.no_grad():
        before = model(batch)
    apply_lora(model, RANK, ALPHA, targets=("wq", "wv", "w2"))
    keys = set(model.state_dict())
    assert keys - base_keys == set(lora_state_dict(model)) and base_keys <= keys
    assert model.layers[0].attention.wq.weight.data_ptr() == wq_storage  # same tensor, not a copy
    assert isinstance(model.layers[1].feed_forward.w2, LoRALinear)
    assert not isinstance(model.layers[1].feed_forward.w1, LoRALinear)
    with torch.no_grad():
        assert torch.equal(model(batch), before)  # B = 0: the adapted model is the base model
    adapter = model.layers[0].attention.wq
    bound = 1 / math.sqrt(adapter.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT
    assert adapter.lora_A.abs().max() <= bound and adapter.lora_A.abs().max() > 0.8 * bound
    assert not adapter.lora_B.any() and adapter.scale == ALPHA / RANK
    result = model.load_state_dict(reference, strict=False)  # a base checkpoint loads into the adapted model
    assert set(result.missing_keys) == set(lora_state_dict(model)) and not result.unexpected_keys


def test_training_moves_only_the_adapters_and_merging_is_exact():
    model = tiny_model(CFG)
    apply_lora(model, RANK, ALPHA, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"))
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    losses = train_adapters(model, steps=6)
    assert losses[-1] < losses[0]
    for key, value in model.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, base[key]), key  # bit-identical after the optimizer steps
            assert model.get_parameter(key).grad is None
    assert all(m.lora_B.abs().max() > 0 for m in model.modules() if isinstance(m, LoRALinear))

    merged = merged_state_dict(model)
    assert set(merged) == set(base) and not any("lora_" in k for k in merged)
    plain = Transformer(CFG)
    plain.load_state_dict(merged, strict=True)
    batch = tokens(3, 16, seed=3, vocab=CFG.vocab_size)
    with torch.no_grad():
        adapted, folded, original = model(batch), plain(batch), tiny_model(CFG)(batch)
    assert torch.allclose(folded, adapted, atol=1e-5, rtol=0)
    assert (folded - original).abs().max() > 1e-3  # the merge really changed the model
    assert torch.equal(model.state_dict()["output.weight"], base["output.weight"])  # merging left the model alone


def test_lora_state_dict_round_trip():
    model = tiny_model(CFG)
    apply_lora(model, RANK, ALPHA, targets=("wq", "wv", "w3"))
    train_adapters(model, steps=3)
    state = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert set(state) == {f"layers.{i}.{w}.{ab}" for i in range(2)
                          for w in ("attention.wq", "attention.wv", "feed_forward.w3") for ab in ("lora_A", "lora_B")}
    assert sum(v.numel() for v in state.values()) == trainable_param_count(model)

    other = tiny_model(CFG)  # same base weights, fresh adapters
    apply_lora(other, RANK, ALPHA, targets=("wq", "wv", "w3"))
    batch = tokens(3, 16, vocab=CFG.vocab_size)
    with torch.no_grad():
        assert not torch.allclose(other(batch), model(batch))
        load_lora_state_dict(other, state)
        assert torch.equal(other(batch), model(batch))


def test_dropout_applies_to_the_adapter_input_in_training_only():
    model = tiny_model(CFG)
    apply_lora(model, RANK, ALPHA, dropout=0.5)
    train_adapters(model, steps=2)
    batch = tokens(3, 16, vocab=CFG.vocab_size)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(batch), model(batch))
        model.eval()
        assert torch.equal(model(batch), model(batch))


@pytest.mark.parametrize("kwargs, pattern", [
    ({"rank": 0}, "LoRA rank must be a positive integer, got 0"),
    ({"rank": -2}, "LoRA rank must be a positive integer"),
    ({"rank": 2.5}, "LoRA rank must be a positive integer"),
    ({"alpha": 0}, "LoRA alpha must be positive"),
    ({"dropout": 1.0}, r"LoRA dropout must be in \[0, 1\)"),
    ({"targets": ("wq", "attention")},
     "unknown LoRA target 'attention'; choose from wq, wk, wv, wo, w1, w2, w3, output"),
    ({"targets": ()}, "no LoRA targets given"),
])
def test_bad_arguments(kwargs, pattern):
    model = tiny_model(CFG)
    args = {"rank": RANK, "alpha": ALPHA, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        apply_lora(model, **args)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # nothing was changed


def test_other_errors():
    model = tiny_model(CFG)
    with pytest.raises(ValueError, match="has no LoRA adapters; call apply_lora"):
        load_lora_state_dict(model, {})
    apply_lora(model, RANK, ALPHA)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, RANK, ALPHA)
    state = lora_state_dict(model)
    extra = {**state, "layers.0.attention.wk.lora_A": torch.zeros(RANK, 64)}
    with pytest.raises(ValueError, match=r"0 missing, 1 \(layers\.0\.attention\.wk\.lora_A\) unexpected"):
        load_lora_state_dict(model, extra)
    partial = dict(list(state.items())[1:])
    with pytest.raises(ValueError, match=r"1 \(layers\.0\.attention\.wq\.lora_A\) missing, 0 unexpected"):
        load_lora_state_dict(model, partial)
    wider = tiny_model(CFG)
    apply_lora(wider, RANK * 2, ALPHA)
    with pytest.raises(ValueError, match=r"has shape \(8, 64\), the model's has \(4, 64\); was the same rank used"):
        load_lora_state_dict(model, lora_state_dict(wider))
    torch.manual_seed(0)
    tied = Transformer(ModelConfig(**{**CFG.__dict__, "tie_embeddings": True}))
    with pytest.raises(ValueError, match="cannot adapt 'output' of a model with tie_embeddings"):
        apply_lora(tied, RANK, ALPHA, targets=("wq", "output"))
    with pytest.raises(ValueError, match="no linear layer named"):
        apply_lora(torch.nn.Sequential(torch.nn.ReLU()), RANK, ALPHA)
