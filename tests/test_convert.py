import argparse
import inspect
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import REPO

from hvd_llama.convert import main
from hvd_llama.model import ModelConfig, Transformer, ffn_hidden_dim
from hvd_llama.weights.checkpoint import load_model_checkpoint, save_checkpoint
from hvd_llama.weights.formats import ffn_settings

transformers = pytest.importorskip("transformers")

BASE = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, multiple_of=16, max_seq_len=64,
                   init_std=0.1)  # a larger init than 0.02 so logits differ clearly between tokens
CONFIGS = {
    "gqa-theta500": replace(BASE, rope_theta=500.0),
    "mha-tied": replace(BASE, n_kv_heads=None, tie_embeddings=True, norm_eps=1e-6),
    "mqa-ffn-multiplier": replace(BASE, n_kv_heads=1, multiple_of=64, ffn_dim_multiplier=1.3, rope_theta=1e6),
}


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    from hvd_llama.tokenizer import train_tokenizer
    lines = [line for line in inspect.getsource(argparse).splitlines() if line.strip()]
    return train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=BASE.vocab_size)


def make_checkpoint(path: Path, cfg: ModelConfig, tokenizer=None, seed=0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    save_checkpoint(path, model.state_dict(), {"model": asdict(cfg)}, tokenizer_path=tokenizer)
    return model


def convert(*args):
    main([str(a) for a in args])


def convert_fails(capsys, *args) -> str:
    """Run the command in-process; assert exit code 2 and one `error:` line; return that line."""
    with pytest.raises(SystemExit) as exc:
        convert(*args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def listing(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_matches_transformers_and_imports_back_exactly(tmp_path, name, capsys):
    cfg = CONFIGS[name]
    model = make_checkpoint(tmp_path / "ckpt", cfg)
    convert("export", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf")
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and f"{model.num_params():,} parameters" in summary[0]
    assert "model.safetensors" in summary[0] and summary[0].endswith(" s")

    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["num_key_value_heads"] == cfg.kv_heads and hf_config["rope_theta"] == cfg.rope_theta
    assert hf_config["intermediate_size"] == cfg.ffn_hidden_dim and hf_config["torch_dtype"] == "float32"
    assert hf_config["tie_word_embeddings"] == cfg.tie_embeddings and hf_config["rms_norm_eps"] == cfg.norm_eps
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_theta"] == cfg.rope_theta
    x = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(hf(x).logits, expected, rtol=0, atol=1e-4)
        assert expected.std() > 0.1  # the comparison is not between near-constant logits

    convert("import", "--hf", tmp_path / "hf", "--out", tmp_path / "back")
    state, back_cfg, tokenizer = load_model_checkpoint(tmp_path / "back")
    assert tokenizer is None
    original = model.state_dict()
    assert state.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(state[key], tensor), key
    assert back_cfg.ffn_hidden_dim == cfg.ffn_hidden_dim
    ignore = {"multiple_of": None, "ffn_dim_multiplier": None}  # any pair giving the same hidden size will do
    assert asdict(back_cfg) | ignore == asdict(cfg) | ignore


def test_export_writes_a_tokenizer_transformers_reads(tmp_path, tokenizer_model):
    import sentencepiece as spm
    make_checkpoint(tmp_path / "ckpt", BASE, tokenizer=tokenizer_model)
    convert("export", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == Path(tokenizer_model).read_bytes()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    for text in ["def parse_args(self, args=None):\n    return 42", "  two spaces\n\n\ttab  ", "héllo ∑ 2024"]:
        ids = hf_tokenizer(text)["input_ids"]
        assert ids == [sp.bos_id()] + sp.encode(text)
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text
    convert("import", "--hf", tmp_path / "hf", "--out", tmp_path / "back")
    assert load_model_checkpoint(tmp_path / "back")[2].read_bytes() == Path(tokenizer_model).read_bytes()


def write_meta_folder(folder: Path, model: Transformer, n_shards: int, dtype=torch.float32) -> None:
    """Meta's release layout: params.json + consolidated.NN.pth split along the model-parallel dims."""
    cfg = model.cfg
    folder.mkdir(parents=True)
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "multiple_of": cfg.multiple_of,
              "norm_eps": cfg.norm_eps, "vocab_size": -1}
    if cfg.n_kv_heads is not None:
        params["n_kv_heads"] = cfg.n_kv_heads
    (folder / "params.json").write_text(json.dumps(params))
    split_dim = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    shards = [{"rope.freqs": torch.zeros(cfg.head_dim // 2)} for _ in range(n_shards)]  # LLaMA 1 saved this
    for key, tensor in model.state_dict().items():
        module = key.removesuffix(".weight").rsplit(".", 1)[-1]
        parts = tensor.to(dtype).chunk(n_shards, split_dim[module]) if tensor.ndim == 2 else [tensor] * n_shards
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")


@pytest.mark.parametrize("n_shards, dtype", [(1, torch.bfloat16), (2, torch.float32)])
def test_import_meta_layout(tmp_path, tokenizer_model, n_shards, dtype):
    torch.manual_seed(0)
    model = Transformer(BASE).eval()
    write_meta_folder(tmp_path / "release" / "7B", model, n_shards, dtype)
    (tmp_path / "release" / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())  # Meta: one level up
    convert("import", "--meta", tmp_path / "release" / "7B", "--out", tmp_path / "ckpt", "--max-seq-len", 128)
    state, cfg, tokenizer = load_model_checkpoint(tmp_path / "ckpt")
    assert tokenizer is not None and cfg == replace(BASE, max_seq_len=128, init_std=0.02)
    for key, tensor in model.state_dict().items():
        assert state[key].dtype == torch.float32
        assert torch.equal(state[key], tensor.to(dtype).float()), key
    # The Meta weights are hvd_llama's layout: no RoPE permutation on this path.
    imported = Transformer(cfg).eval()
    imported.load_state_dict(state)
    x = torch.randint(0, BASE.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(imported(x), model(x), rtol=0, atol=1e-5 if dtype == torch.float32 else 0.5)


@pytest.mark.parametrize("dim, hidden", [(4096, 11008), (5120, 13824), (6656, 17920), (8192, 22016),
                                         (8192, 28672), (64, 176), (64, 100), (96, 1000), (4096, 14336)])
def test_ffn_settings_reproduce_the_hidden_size(dim, hidden):
    multiple_of, multiplier = ffn_settings(dim, hidden)
    assert ffn_hidden_dim(dim, multiple_of, multiplier) == hidden


def test_not_a_llama_folder_subprocess(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "hvd_llama.convert", "import", "--hf", str(tmp_path / "empty"),
                             "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'empty'} is not a Hugging Face LLaMA folder: it has no config.json"
    assert not out.exists()


@pytest.fixture
def hf_folder(tmp_path):
    make_checkpoint(tmp_path / "ckpt", BASE)
    convert("export", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf")
    return tmp_path / "hf"


def edit_json(path: Path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def edit_tensors(path: Path, drop=(), add=None):
    tensors = {k: v for k, v in load_file(path).items() if k not in drop}
    save_file(tensors | (add or {}), path)


@pytest.mark.parametrize("damage, message", [
    (lambda hf: edit_json(hf / "config.json", model_type="gpt2"), "model_type is 'gpt2', expected 'llama'"),
    (lambda hf: edit_json(hf / "config.json", rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     "rope type 'yarn' is not supported"),
    (lambda hf: (hf / "model.safetensors").unlink(), "has no model.safetensors or pytorch_model.bin"),
    (lambda hf: (hf / "model.safetensors").write_bytes(b"not weights"), "cannot read weights file"),
    (lambda hf: edit_tensors(hf / "model.safetensors", drop=["model.layers.1.mlp.up_proj.weight"]),
     "model.safetensors: missing tensor model.layers.1.mlp.up_proj.weight"),
    (lambda hf: edit_json(hf / "config.json", intermediate_size=192),
     "tensor model.layers.0.mlp.gate_proj.weight has shape [176, 64], the configuration implies [192, 64]"),
    (lambda hf: edit_tensors(hf / "model.safetensors", add={"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
     "unexpected tensor model.layers.0.self_attn.q_proj.bias"),
    (lambda hf: edit_json(hf / "config.json", num_key_value_heads=3), "n_kv_heads (3) must be a positive divisor"),
])
def test_bad_hf_folder_is_refused_and_nothing_is_written(tmp_path, hf_folder, capsys, damage, message):
    damage(hf_folder)
    before = listing(tmp_path)
    err = convert_fails(capsys, "import", "--hf", hf_folder, "--out", tmp_path / "new" / "ckpt")
    assert message in err
    assert listing(tmp_path) == before  # no output folder, no temporary leftovers


def test_bad_meta_folder_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    meta = tmp_path / "meta"
    write_meta_folder(meta, Transformer(BASE), n_shards=2)
    shard = torch.load(meta / "consolidated.01.pth")
    del shard["layers.0.feed_forward.w2.weight"]
    torch.save(shard, meta / "consolidated.01.pth")
    before = listing(tmp_path)
    err = convert_fails(capsys, "import", "--meta", meta, "--out", tmp_path / "ckpt")
    assert "consolidated.01.pth: missing tensor layers.0.feed_forward.w2.weight" in err
    assert listing(tmp_path) == before
    (meta / "params.json").unlink()
    err = convert_fails(capsys, "import", "--meta", meta, "--out", tmp_path / "ckpt")
    assert "is not a Meta LLaMA folder: it has no params.json" in err
    assert not (tmp_path / "ckpt").exists()


def test_export_refuses_existing_output_and_missing_checkpoint(tmp_path, capsys):
    make_checkpoint(tmp_path / "ckpt", BASE)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    before = listing(tmp_path)
    err = convert_fails(capsys, "export", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf")
    assert "already exists" in err
    err = convert_fails(capsys, "export", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "hf2")
    assert "nope" in err
    assert listing(tmp_path) == before
