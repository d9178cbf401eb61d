"""LLaMA weights in Hugging Face's and Meta's layouts: names, the rotary permutation, shape checks, and
reading either folder into an hvd_llama state dict and ModelConfig (writing Hugging Face's config too).

hvd_llama uses Meta's parameter names and rotary layout (pairs (x[2k], x[2k+1]) of each head rotate together);
transformers rotates (x[k], x[k + head_dim/2]) instead, so wq/wk rows are permuted on the way out and back on
the way in, as in transformers' convert_llama_weights_to_hf.py.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import sentencepiece as spm
import torch
from safetensors import safe_open

from hvd_llama.cli import UserError
from hvd_llama.files import read_json
from hvd_llama.model import ModelConfig, Transformer, ffn_hidden_dim

# hvd_llama (Meta) module names -> Hugging Face module names.
HF_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
HF_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}
# Dimension along which Meta's model-parallel shards split each matrix (fairscale Column/RowParallelLinear);
# norms are replicated. tok_embeddings is split along dim 1 in LLaMA 1/2 (ParallelEmbedding), dim 0 later.
META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}
IGNORED = ("rope.freqs", "rotary_emb.inv_freq")  # precomputed RoPE tables some releases saved


def hf_name(key: str) -> str:
    module = key.removesuffix(".weight")
    if module.startswith("layers."):
        _, index, rest = module.split(".", 2)
        return f"model.layers.{index}.{HF_LAYER[rest]}.weight"
    return f"{HF_TOP[module]}.weight"


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Name -> shape of every weight of this architecture (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in Transformer(cfg).state_dict().items()}


def rotary_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from interleaved pairs (Meta) to two halves (transformers' `permute`)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rotary_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rotary_heads(key: str, cfg: ModelConfig) -> Optional[int]:
    """Heads whose rows the RoPE permutation reorders, or None for tensors it leaves alone."""
    if key.endswith("attention.wq.weight"):
        return cfg.n_heads
    if key.endswith("attention.wk.weight"):
        return cfg.kv_heads
    return None


def check_tensors(tensors: dict, shapes: dict[str, torch.Size], source: str, name=lambda key: key) -> None:
    """UserError on the first missing, extra or mis-shaped tensor; `name` maps our key to the source's."""
    wanted = {name(key): shape for key, shape in shapes.items()}
    for key, shape in wanted.items():
        if key not in tensors:
            raise UserError(f"{source}: missing tensor {key}")
        if tuple(tensors[key].shape) != tuple(shape):
            raise UserError(f"{source}: tensor {key} has shape {list(tensors[key].shape)}, "
                            f"the configuration implies {list(shape)}")
    extra = sorted(k for k in tensors if k not in wanted and not k.endswith(IGNORED))
    if extra:
        raise UserError(f"{source}: unexpected tensor {extra[0]} (not part of this LLaMA configuration)")


def ffn_settings(dim: int, hidden: int) -> tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's rounding rule gives exactly `hidden`."""
    multiple_of = hidden & -hidden  # largest power of two dividing it
    base = int(2 * (4 * dim) / 3)
    # Prefer no multiplier, then a short decimal one (Llama 2 70B: 1.3), else one that is exact by construction.
    for multiplier in [None, *(round(hidden / base, digits) for digits in range(1, 7)), (hidden + 0.5) / base]:
        if ffn_hidden_dim(dim, multiple_of, multiplier) == hidden:
            return multiple_of, multiplier
    raise AssertionError("unreachable: the last multiplier reproduces hidden")


def validated(cfg: ModelConfig, source: str) -> ModelConfig:
    try:
        return cfg.validate()
    except ValueError as err:
        raise UserError(f"{source}: {err}") from None


# ---------------------------------------------------------------------------------------- Hugging Face out

def hf_config(cfg: ModelConfig, special_ids: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "initializer_range": cfg.init_std, "torch_dtype": "float32",
        "use_cache": True, **special_ids,
    }


def tokenizer_files(tokenizer_path: Path, cfg: ModelConfig) -> tuple[dict, dict]:
    """(special token ids for config.json, tokenizer_config.json) read from the SentencePiece model."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    ids = {k: v for k, v in ids.items() if v >= 0}
    pieces = {f"{name}_token": sp.id_to_piece(i) if i >= 0 else None
              for name, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()), ("pad", sp.pad_id()))}
    # LLaMA's own tokenizer prepends "▁" to the text; hvd_llama's (add_dummy_prefix=False) does not.
    dummy_prefix = sp.encode("x", out_type=str)[0].startswith("\u2581")
    tok_config = {"tokenizer_class": "LlamaTokenizer", **pieces, "add_bos_token": True, "add_eos_token": False,
                  "add_prefix_space": dummy_prefix, "legacy": False, "model_max_length": cfg.max_seq_len,
                  "clean_up_tokenization_spaces": False}
    return ids, tok_config


def hf_state_dict(state: dict, cfg: ModelConfig) -> dict:
    """An hvd_llama state dict under Hugging Face's names and rotary layout (fp32, contiguous)."""
    hf_state = {}
    for key, tensor in state.items():
        if cfg.tie_embeddings and key == "output.weight":
            continue  # transformers ties lm_head to embed_tokens itself
        heads = rotary_heads(key, cfg)
        tensor = tensor.float()
        hf_state[hf_name(key)] = (rotary_to_hf(tensor, heads) if heads else tensor).contiguous()
    return hf_state


# ------------------------------------------------------------------------------------------------------- in

class LazyState(Mapping):
    """A state dict under hvd_llama's names whose tensors are read (and converted) only when asked for, one at a
    time: a rank of a ZeRO stage-3 run keeps its slices of each and lets the rest go. Shapes are known unread."""

    def __init__(self, shapes: dict, read: Callable[[str], torch.Tensor]):
        self.shapes, self._read = shapes, read

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise KeyError(key)
        return self._read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


@dataclass
class Stored:
    """A tensor in a weights file, read when load() is called."""
    shape: tuple
    load: Callable[[], torch.Tensor]


def stored_tensors(path: Path) -> dict[str, Stored]:
    """The tensors of a weights file, unread: safetensors through safe_open (each tensor read alone when loaded),
    torch's files memory-mapped (their pages count in the resident memory as they are read: page cache)."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                return {name: Stored(tuple(handle.get_slice(name).get_shape()),
                                     lambda name=name: _read_stored(path, name)) for name in handle.keys()}
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a truncated or foreign file: name it rather than show a traceback
        raise UserError(f"cannot read weights file {path}: {err}") from None
    return {name: Stored(tuple(t.shape), lambda t=t: t) for name, t in tensors.items()}


def _read_stored(path: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, through a mapping of the file closed right after: the file's pages it
    touched leave the process's resident memory with it (a mapping kept open would count every page read)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name)
    except Exception as err:
        raise UserError(f"cannot read tensor {name} of {path}: {err}") from None


def hf_weight_files(folder: Path) -> list[Path]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            weight_map = read_json(folder / index, "Hugging Face").get("weight_map", {})
            files = [folder / name for name in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise UserError(f"{folder / index} lists {f.name}, which is missing")
            return files
    raise UserError(f"{folder} has no model.safetensors or pytorch_model.bin (nor a sharded index)")


def config_from_hf(hf: dict, source: str) -> ModelConfig:
    if hf.get("model_type") != "llama":
        raise UserError(f"{source}: model_type is {hf.get('model_type')!r}, expected 'llama'")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers >= 5 | < 5
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    for field, value, supported in (("hidden_act", hf.get("hidden_act", "silu"), "silu"),
                                    ("attention_bias", hf.get("attention_bias", False), False),
                                    ("mlp_bias", hf.get("mlp_bias", False), False),
                                    ("rope type", rope_type, "default")):
        if value != supported:
            raise UserError(f"{source}: {field} {value!r} is not supported by hvd_llama's model (only {supported!r})")
    try:
        dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("head_dim", dim // n_heads) != dim // n_heads:
            raise UserError(f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
        multiple_of, multiplier = ffn_settings(dim, hf["intermediate_size"])
        n_kv_heads = hf.get("num_key_value_heads") or n_heads
        cfg = ModelConfig(dim=dim, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                          n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads, vocab_size=hf["vocab_size"],
                          multiple_of=multiple_of, ffn_dim_multiplier=multiplier,
                          norm_eps=hf.get("rms_norm_eps", 1e-6),
                          rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                          max_seq_len=hf.get("max_position_embeddings", 2048),
                          tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                          init_std=hf.get("initializer_range", 0.02))
    except KeyError as err:
        raise UserError(f"{source}: missing field {err.args[0]}") from None
    except TypeError as err:
        raise UserError(f"{source}: {err}") from None
    return validated(cfg, source)


def import_hf(folder: Path) -> tuple[dict, ModelConfig, Optional[Path]]:
    cfg = config_from_hf(read_json(folder / "config.json", "Hugging Face LLaMA"), f"{folder}/config.json")
    files = hf_weight_files(folder)
    tensors = {}
    for f in files:
        tensors.update(stored_tensors(f))
    shapes = expected_shapes(cfg)
    stored_shapes = {k: v for k, v in shapes.items() if not (cfg.tie_embeddings and k == "output.weight")}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied exports still store the shared matrix twice
    check_tensors(tensors, stored_shapes, str(files[0] if len(files) == 1 else folder), name=hf_name)

    def read(key: str) -> torch.Tensor:
        key = "tok_embeddings.weight" if key == "output.weight" and cfg.tie_embeddings else key
        heads = rotary_heads(key, cfg)
        tensor = tensors[hf_name(key)].load().float()
        return (rotary_from_hf(tensor, heads) if heads else tensor).contiguous()

    tokenizer = folder / "tokenizer.model"
    return LazyState(shapes, read), cfg, tokenizer if tokenizer.is_file() else None


def meta_split_dim(key: str, first: Stored, dim: int) -> Optional[int]:
    """The dimension model-parallel shards of `key` were split on, or None for a replicated tensor."""
    module = key.removesuffix(".weight").rsplit(".", 1)[-1]
    if len(first.shape) == 1 or key.endswith(IGNORED):
        return None
    return 1 if module == "tok_embeddings" and first.shape[1] != dim else META_SHARD_DIM.get(module, 0)


def merge_meta_shards(shards: list[dict], files: list[Path], dim: int) -> dict[str, Stored]:
    """Model-parallel shards (stored, unread) as whole tensors concatenated along the dimension each tensor was
    split on when loaded, one at a time."""
    merged = {}
    for key, first in shards[0].items():
        parts = []
        for shard, f in zip(shards, files):
            if key not in shard:
                raise UserError(f"{f}: missing tensor {key} (present in {files[0].name})")
            parts.append(shard[key])
        split = meta_split_dim(key, first, dim) if len(parts) > 1 else None
        if split is None:
            merged[key] = first  # replicated
            continue
        shape = list(first.shape)
        shape[split] = sum(p.shape[split] for p in parts)
        if any(p.shape[:split] + p.shape[split + 1:] != first.shape[:split] + first.shape[split + 1:] for p in parts):
            raise UserError(f"{files[0].parent}: shards of {key} have incompatible shapes "
                            f"{[list(p.shape) for p in parts]}")
        merged[key] = Stored(tuple(shape), lambda parts=parts, split=split: torch.cat([p.load() for p in parts],
                                                                                     dim=split))
    return merged


def import_meta(folder: Path) -> tuple[dict, ModelConfig, Optional[Path]]:
    params = read_json(folder / "params.json", "Meta LLaMA")
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise UserError(f"{folder} is not a Meta LLaMA folder: it has no consolidated.*.pth")
    source = f"{folder}/params.json"
    if params.get("use_scaled_rope"):
        raise UserError(f"{source}: use_scaled_rope (Llama 3.1 RoPE scaling) is not supported by hvd_llama's model")
    if "dim" not in params:
        raise UserError(f"{source}: missing field dim")
    state = state_of = merge_meta_shards([stored_tensors(f) for f in files], files, params["dim"])
    weights = str(files[0]) if len(files) == 1 else f"{folder}/consolidated.*.pth"
    vocab_size = params.get("vocab_size", -1)
    if vocab_size <= 0:  # LLaMA 1/2 write -1 (the tokenizer decides); the embedding table knows
        if "tok_embeddings.weight" not in state:
            raise UserError(f"{weights}: missing tensor tok_embeddings.weight")
        vocab_size = state["tok_embeddings.weight"].shape[0]
    try:
        cfg = ModelConfig(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                          n_kv_heads=params.get("n_kv_heads"), vocab_size=vocab_size,
                          multiple_of=params.get("multiple_of", 256),
                          ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
                          norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
                          max_seq_len=2048)  # params.json has no context length: LLaMA's, unless --max-seq-len
    except KeyError as err:
        raise UserError(f"{source}: missing field {err.args[0]}") from None
    cfg = validated(cfg, source)
    shapes = expected_shapes(cfg)
    check_tensors(state, shapes, weights)
    state = LazyState(shapes, lambda key: state_of[key].load().float().contiguous())
    tokenizer = next((p for p in (folder / "tokenizer.model", folder.parent / "tokenizer.model") if p.is_file()), None)
    return state, cfg, tokenizer

