"""Checkpoints: one folder per step, written atomically, verified by a checksum manifest.

Layout of runs/<name>/checkpoints/step_00000100/:
    model.pt         state dict of the plain (uncompiled, unwrapped) Transformer, fp32
                     (LoRA runs: adapter.pt, the adapters alone; the base is config.yaml's finetune.init_from)
    config.yaml      the resolved config; its `model:` section rebuilds the architecture
    tokenizer.model  the SentencePiece model the data was encoded with (when known)
    train_state.pt   progress (step, global data position, world size), RNG states, loss scale, ZeRO stage,
                     and at dist.zero_stage=0 the whole optimizer state (training checkpoints only)
    optimizer.rank00001-of-00004.pt
                     at stages 1 and 2: each rank's own optimizer slice, written by that rank (dist/zero.py's
                     world-size-independent slice format, so a resume at another world size reshards)
    manifest.json    written last: {"step": N, "files": {name: sha256}}; no manifest = incomplete

Files are hashed while they are written (never read back for it) and verified once when a checkpoint is found.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import yaml

from hvd_llama.cli import UserError, atomic_write_text, new_staging_dir, sha256_file, staging_dir
from hvd_llama.model import ModelConfig

MANIFEST = "manifest.json"
STEP_PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


SLICE_GLOB = "optimizer.rank*-of-*.pt"


def slice_name(rank: int, world_size: int) -> str:
    return f"optimizer.rank{rank:05d}-of-{world_size:05d}.pt"


class _HashingWriter:
    """A binary file that hashes what goes through it, so a checkpoint file is never re-read to be hashed."""

    def __init__(self, file):
        self.file, self.digest = file, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def write_torch(path: Path, obj) -> str:
    """torch.save `obj` to `path`, fsync it, and return the sha256 of the bytes written."""
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(obj, writer)
        f.flush()
        os.fsync(f.fileno())
    return writer.digest.hexdigest()


def begin_checkpoint(ckpt_dir) -> Path:
    """The staging folder of a checkpoint that several ranks write into (save_checkpoint(staging=...))."""
    return new_staging_dir(ckpt_dir)


def save_checkpoint(ckpt_dir, model_state: dict, config: dict, tokenizer_path=None,
                    train_state: Optional[dict] = None, step: int = 0, weights_file: str = "model.pt",
                    staging: Optional[Path] = None, written: Optional[dict] = None) -> Path:
    """Write a complete checkpoint into a temporary folder, then rename it into place.

    `staging`/`written`: a folder from begin_checkpoint that already holds files (each rank's optimizer
    slice) with their sha256. A crash or a full disk leaves either the old folder or the new one, never a mix:
    the temporary folder is removed on failure and the error propagates so the caller can report it.
    """
    ckpt_dir = Path(ckpt_dir)
    with staging_dir(ckpt_dir, staging) as tmp:  # re-saving a step swaps folders: a valid copy at every instant
        files = dict(written or {})
        files[weights_file] = write_torch(tmp / weights_file, model_state)
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        files["config.yaml"] = sha256_file(tmp / "config.yaml")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
            files["tokenizer.model"] = sha256_file(tmp / "tokenizer.model")
        if train_state is not None:
            files["train_state.pt"] = write_torch(tmp / "train_state.pt", train_state)
        atomic_write_text(tmp / MANIFEST, json.dumps({"step": step, "files": dict(sorted(files.items()))}, indent=1))
    return ckpt_dir


def verify_checkpoint(ckpt_dir) -> dict:
    """Return the manifest if every file is present with the recorded checksum, else raise UserError."""
    ckpt_dir = Path(ckpt_dir)
    manifest_path = ckpt_dir / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{ckpt_dir} is not a complete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        raise UserError(f"{manifest_path} is unreadable ({err})") from None
    for name, digest in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            raise UserError(f"checkpoint {ckpt_dir} is missing {name}")
        if sha256_file(path) != digest:
            raise UserError(f"checkpoint {ckpt_dir} is corrupt: checksum of {name} does not match its manifest")
    return manifest


def list_checkpoints(root) -> list[Path]:
    """Checkpoint folders under a run dir or a checkpoints dir, oldest first (temporary folders excluded)."""
    root = Path(root)
    folder = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))


def find_latest_checkpoint(root) -> Optional[Path]:
    """The newest checkpoint that verifies; corrupt newer ones are reported and skipped."""
    for ckpt in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except UserError as err:
            warnings.warn(f"skipping checkpoint: {err}", stacklevel=2)
    return None


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder as given, or the newest good one when given a run or checkpoints folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint path {path} does not exist")
    if (path / MANIFEST).is_file() or (path / "model.pt").is_file():
        verify_checkpoint(path)
        return path
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise UserError(f"no complete checkpoint found under {path}")
    return latest


def read_config(ckpt_dir) -> dict:
    return yaml.safe_load((Path(ckpt_dir) / "config.yaml").read_text()) or {}


def load_model_checkpoint(path):
    """Return (state_dict, ModelConfig, tokenizer path or None) from a checkpoint, run or checkpoints folder."""
    return read_model_checkpoint(resolve_checkpoint(path))


def read_model_checkpoint(ckpt: Path):
    """load_model_checkpoint for a checkpoint folder already verified (resolve_checkpoint, find_latest_checkpoint)."""
    model_fields = read_config(ckpt).get("model")
    if not isinstance(model_fields, dict):
        raise UserError(f"{ckpt}/config.yaml has no `model:` section")
    try:
        model_cfg = ModelConfig(**model_fields)
    except TypeError as err:
        raise UserError(f"{ckpt}/config.yaml: incompatible model section ({err})") from None
    state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    tokenizer = ckpt / "tokenizer.model"
    return state, model_cfg, (tokenizer if tokenizer.is_file() else None)


def load_train_state(ckpt_dir) -> dict:
    return torch.load(Path(ckpt_dir) / "train_state.pt", map_location="cpu", weights_only=False)


def read_optimizer_slices(ckpt_dir) -> list:
    """Every rank's optimizer slice of a sharded checkpoint, memory-mapped: a rank copies only the ranges it
    owns now, so loading does not read the whole optimizer state into every rank's memory."""
    paths = sorted(Path(ckpt_dir).glob(SLICE_GLOB))
    if not paths:
        raise UserError(f"{ckpt_dir} holds no optimizer slices ({SLICE_GLOB}); was it written at dist.zero_stage=0?")
    return [torch.load(p, map_location="cpu", mmap=True, weights_only=True) for p in paths]


def prune_checkpoints(root, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
