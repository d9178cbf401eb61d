"""Convert LLaMA weights between hvd_llama checkpoints, Hugging Face folders and Meta's original release.

    python -m hvd_llama.convert export --checkpoint runs/x --out hf/x       # a folder transformers loads
    python -m hvd_llama.convert import --hf Llama-2-7b-hf --out ckpt/llama2-7b
    python -m hvd_llama.convert import --meta llama-2-7b --out ckpt/llama2-7b   # consolidated.*.pth + params.json
    python -m hvd_llama.convert consolidate --checkpoint runs/70b --out ckpt/70b  # a ZeRO stage-3 checkpoint's
                                                                                   # slices as one model.pt

hvd_llama uses Meta's parameter names and rotary layout; Hugging Face's wq/wk rows are permuted on the way out
and back on the way in (formats.py). Every tensor's name and shape is checked against the configuration
before anything is written, and outputs appear atomically or not at all.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Union

from safetensors.torch import save_file

from hvd_llama.cli import UserError, run_main
from hvd_llama.files import staging_dir
from hvd_llama.model import ModelConfig
from hvd_llama.weights.checkpoint import save_checkpoint
from hvd_llama.weights.formats import (
    check_tensors,
    expected_shapes,
    hf_config,
    hf_state_dict,
    import_hf,
    import_meta,
    tokenizer_files,
    validated,
)
from hvd_llama.weights.pretrained import load_weights


def count_params(state: dict, cfg: ModelConfig) -> int:
    return sum(v.numel() for k, v in state.items() if not (cfg.tie_embeddings and k == "output.weight"))


@dataclass
class CheckpointConfig:
    """`convert export`'s and `convert consolidate`'s options: a checkpoint read, a new folder written (export: a
    Hugging Face folder, config.json + model.safetensors + the tokenizer files; consolidate: a checkpoint folder,
    model.pt + config.yaml + tokenizer.model)."""
    checkpoint: str  # checkpoint folder, or a run folder (its newest complete checkpoint is used)
    out: str


@dataclass
class ImportConfig:
    """`convert import`'s options: the source is hf or meta (argparse requires exactly one)."""
    out: str  # new checkpoint folder
    hf: Optional[str] = None  # Hugging Face folder: config.json + *.safetensors or *.bin
    meta: Optional[str] = None  # Meta's release folder: params.json + consolidated.*.pth
    tokenizer: Optional[str] = None  # tokenizer.model to include; None: the source folder's (for meta: or its parent's)
    max_seq_len: Optional[int] = None  # context length to record; None: hf's max_position_embeddings, meta's 2048


def refuse_existing(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists; choose a new folder")


def export(args: CheckpointConfig) -> str:
    out = Path(args.out)
    refuse_existing(out)
    state, cfg, tokenizer = load_weights(args.checkpoint)  # LoRA checkpoints arrive merged
    cfg = validated(cfg, f"{args.checkpoint}: config.yaml")
    check_tensors(state, expected_shapes(cfg), f"{args.checkpoint}: model.pt")
    hf_state = hf_state_dict(state, cfg)
    special_ids, tok_config = tokenizer_files(tokenizer, cfg) if tokenizer else ({"bos_token_id": 1,
                                                                                  "eos_token_id": 2}, None)
    with staging_dir(out) as tmp:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, special_ids), indent=2) + "\n")
        if tokenizer:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        written = sorted(p.name for p in tmp.iterdir())
    return f"exported {count_params(state, cfg):,} parameters to {out} ({', '.join(written)})"


def import_(args: ImportConfig) -> str:
    out = Path(args.out)
    refuse_existing(out)
    state, cfg, tokenizer = import_hf(Path(args.hf)) if args.hf else import_meta(Path(args.meta))
    state = dict(state)  # read: a checkpoint's model.pt holds the tensors themselves
    if args.max_seq_len is not None:
        cfg = validated(replace(cfg, max_seq_len=args.max_seq_len), "--max-seq-len")
    if args.tokenizer:
        tokenizer = Path(args.tokenizer)
        if not tokenizer.is_file():
            raise UserError(f"--tokenizer {tokenizer} does not exist")
    save_checkpoint(out, state, {"model": asdict(cfg)}, tokenizer_path=tokenizer)
    written = sorted(p.name for p in out.iterdir())
    source = args.hf or args.meta
    return f"imported {count_params(state, cfg):,} parameters from {source} to {out} ({', '.join(written)})"


def consolidate(args: CheckpointConfig) -> str:
    """Any hvd_llama checkpoint (a ZeRO stage-3 one has its weights in every rank's slice; a LoRA one, adapters
    over a base) as a single-file checkpoint of the whole model: the weights assembled one tensor at a time."""
    out = Path(args.out)
    refuse_existing(out)
    state, cfg, tokenizer = load_weights(args.checkpoint)
    save_checkpoint(out, state, {"model": asdict(cfg)}, tokenizer_path=tokenizer)
    written = ", ".join(sorted(p.name for p in out.iterdir()))
    return f"consolidated {count_params(state, cfg):,} parameters into {out} ({written})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hvd_llama.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{export,import,consolidate}")
    exp = commands.add_parser("export", help="hvd_llama checkpoint -> Hugging Face LLaMA folder")
    exp.add_argument("--checkpoint", required=True,
                     help="checkpoint folder, or a run folder (its newest complete checkpoint is used)")
    exp.add_argument("--out", required=True, help="new folder for config.json, model.safetensors, tokenizer files")
    imp = commands.add_parser("import", help="Hugging Face or Meta LLaMA folder -> hvd_llama checkpoint")
    source = imp.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="DIR", help="Hugging Face folder: config.json + *.safetensors or *.bin")
    source.add_argument("--meta", metavar="DIR", help="Meta's release folder: params.json + consolidated.*.pth")
    imp.add_argument("--out", required=True, help="new checkpoint folder (usable by evaluate, generate, train)")
    imp.add_argument("--tokenizer", help="SentencePiece tokenizer.model to include (default: the source folder's; "
                                         "for --meta also its parent, as in Meta's downloads)")
    imp.add_argument("--max-seq-len", type=int, help="context length to record (default: --hf config.json's "
                                                     "max_position_embeddings; --meta 2048. Llama 2 is 4096)")
    con = commands.add_parser("consolidate", help="hvd_llama checkpoint (a ZeRO stage-3 one: every rank's slice) -> "
                                                  "a single-file checkpoint (model.pt)")
    con.add_argument("--checkpoint", required=True,
                     help="checkpoint folder, or a run folder (its newest complete checkpoint is used)")
    con.add_argument("--out", required=True, help="new checkpoint folder (usable by evaluate, generate, train)")
    return parser


COMMANDS = {"export": (CheckpointConfig, export), "import": (ImportConfig, import_),
            "consolidate": (CheckpointConfig, consolidate)}


def parse_args(argv: Optional[Sequence[str]]) -> tuple[str, Union[CheckpointConfig, ImportConfig]]:
    """(the subcommand, its options)."""
    options = vars(build_parser().parse_args(argv))
    command = options.pop("command")
    return command, COMMANDS[command][0](**options)


def _main(argv=None) -> None:
    command, args = parse_args(argv)
    start = time.perf_counter()
    summary = COMMANDS[command][1](args)
    print(f"{summary} in {time.perf_counter() - start:.1f} s", flush=True)


def main(argv=None) -> None:
    run_main(_main, argv)


if __name__ == "__main__":
    main()
