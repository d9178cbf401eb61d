"""Checkpoints: one folder per step, written atomically, verified by a checksum manifest.

Layout of runs/<name>/checkpoints/step_00000100/:
    model.pt         state dict of the plain (uncompiled, unwrapped) Transformer, in the dtype training holds
                     the weights in (fp32; bf16 with bf16 weights, whose fp32 master copy is in the slices)
                     (LoRA runs: adapter.pt, the adapters alone; the base is config.yaml's finetune.init_from)
    config.yaml      the resolved config; its `model:` section rebuilds the architecture
    tokenizer.model  the SentencePiece model the data was encoded with (when known)
    train_state.pt   progress (step, global data position, world size), RNG states, loss scale, ZeRO stage,
                     and at dist.zero_stage=0 the whole optimizer state (training checkpoints only); tensors and
                     plain values only, loaded with weights_only=True: a crafted file cannot run code
    optimizer.rank00001-of-00004.pt
                     at stages 1 and 2: each rank's own optimizer slice, written by that rank (parallel/zero.py's
                     world-size-independent slice format, so a resume at another world size reshards)
    manifest.json    written last: {"step": N, "files": {name: sha256}}; no manifest = incomplete

Files are hashed while they are written (never read back for it) and verified once when a checkpoint is found.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import shutil
import socket
import warnings
from pathlib import Path
from typing import Optional

import torch
import yaml

from hvd_llama.cli import UserError
from hvd_llama.files import atomic_write_text, is_staging_name, new_staging_dir, sha256_file, staging_dir
from hvd_llama.model import ModelConfig
from hvd_llama.training.zero_layout import SliceIndex, check_slices

MANIFEST = "manifest.json"
MODEL_FILE = "model.pt"  # the weights as training holds them (fp32, or bf16 with bf16 weights)
ADAPTER_FILE = "adapter.pt"  # LoRA runs: the adapters alone
TOKENIZER_FILE = "tokenizer.model"
TRAIN_STATE_FILE = "train_state.pt"
STEP_PREFIX = "step_"
LOCK_FILE = ".lock"
_HELD: list = []  # the run-dir locks this process holds


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


def save_checkpoint(ckpt_dir, model_state: Optional[dict], config: dict, tokenizer_path=None,
                    train_state: Optional[dict] = None, step: int = 0, weights_file: str = MODEL_FILE,
                    staging: Optional[Path] = None, written: Optional[dict] = None) -> Path:
    """Write a complete checkpoint into a temporary folder, then rename it into place.

    `staging`/`written`: a folder from begin_checkpoint that already holds files (each rank's optimizer
    slice) with their sha256; `model_state` None: the weights are in those slices (ZeRO stage 3). A crash or a
    full disk leaves either the old folder or the new one, never a mix:
    the temporary folder is removed on failure and the error propagates so the caller can report it.
    """
    ckpt_dir = Path(ckpt_dir)
    with staging_dir(ckpt_dir, staging) as tmp:  # re-saving a step swaps folders: a valid copy at every instant
        files = dict(written or {})
        if model_state is not None:
            files[weights_file] = write_torch(tmp / weights_file, model_state)
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        files["config.yaml"] = sha256_file(tmp / "config.yaml")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
            files[TOKENIZER_FILE] = sha256_file(tmp / TOKENIZER_FILE)
        if train_state is not None:
            files[TRAIN_STATE_FILE] = write_torch(tmp / TRAIN_STATE_FILE, train_state)
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
    if (path / MANIFEST).is_file() or (path / MODEL_FILE).is_file():  # a checkpoint folder, not a run folder
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
    state = load_tensors(ckpt / MODEL_FILE) if (ckpt / MODEL_FILE).is_file() else weights_from_slices(ckpt)
    tokenizer = ckpt / TOKENIZER_FILE
    return state, model_cfg, (tokenizer if tokenizer.is_file() else None)


def load_tensors(path: Path):
    """A file of tensors and plain values, memory-mapped (pages are read as they are copied out). Anything else is
    refused: unpickling arbitrary objects can run code, and a checkpoint may come from anywhere."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        found = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line),
                     "not a weights-only file")
        raise UserError(f"{path} holds objects other than tensors and plain values ({found}); refused, since "
                        "loading them could run code. Checkpoints written before hvd_llama stored its RNG state as "
                        "tensors (2026-12) cannot be resumed; their weights still load with --init-from") from None


def read_adapters(ckpt: Path) -> dict:
    """The LoRA adapters of a LoRA checkpoint."""
    return load_tensors(ckpt / ADAPTER_FILE) if (ckpt / ADAPTER_FILE).is_file() else weights_from_slices(ckpt)


def weights_from_slices(ckpt: Path) -> dict:
    """The trainable weights of a ZeRO stage-3 checkpoint, assembled one tensor at a time from every rank's slice
    (memory-mapped: each tensor's ranges are read as it is assembled): the whole model, or LoRA's adapters."""
    slices = read_optimizer_slices(ckpt)
    if not all("param" in s for s in slices):
        raise UserError(f"{ckpt} holds neither {MODEL_FILE} nor the weights in its optimizer slices")
    return SliceIndex(check_slices(slices)).parameters(slices[0]["params"], "param")


def load_train_state(ckpt_dir) -> dict:
    return load_tensors(Path(ckpt_dir) / TRAIN_STATE_FILE)


def read_optimizer_slices(ckpt_dir) -> list:
    """Every rank's optimizer slice of a sharded checkpoint, memory-mapped: a rank copies only the ranges it
    owns now, so loading does not read the whole optimizer state into every rank's memory."""
    paths = sorted(Path(ckpt_dir).glob(SLICE_GLOB))
    if not paths:
        raise UserError(f"{ckpt_dir} holds no optimizer slices ({SLICE_GLOB}); was it written at dist.zero_stage=0?")
    return [load_tensors(p) for p in paths]


class RunDirLock:
    """An exclusive lock on a run dir for the life of the process that takes it (training's rank 0, at start-up).

    A second job started in the same run dir stops in one line instead of interleaving checkpoints; and since no
    live job can then be writing into it, the folders that killed saves left behind (`.step_*.tmp-*`, as large as
    a checkpoint each) are removed. A filesystem without flock (some Lustre mounts) gets neither: `held` is False.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "owner unknown"
            self.file.close()
            raise UserError(f"{run_dir} is in use by another job ({owner}): stop it first, or choose another "
                            "--run-dir") from None
        except OSError:
            self.held = False
            return
        self.held = True
        _HELD.append(self)  # released when the process ends, however it ends
        self.file.truncate(0)
        self.file.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
        self.file.flush()

    def remove_stale_saves(self) -> str:
        """Remove what interrupted saves left in the run dir's checkpoints folder; say what went (or why nothing)."""
        folder = self.run_dir / "checkpoints"
        stale = sorted(p for p in folder.glob(f".{STEP_PREFIX}*") if p.is_dir() and is_staging_name(p.name))
        if not stale:
            return ""
        if not self.held:
            return (f"kept {len(stale)} folder(s) of interrupted saves in {folder}: its filesystem cannot be locked, "
                    "so another job could own them (remove them by hand when none runs)")
        size = sum(f.stat().st_size for p in stale for f in p.rglob("*") if f.is_file())
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return (f"removed {len(stale)} folder(s) left by interrupted saves ({size / 1e9:.2f} GB): "
                f"{', '.join(p.name for p in stale)}")


def prune_checkpoints(root, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
