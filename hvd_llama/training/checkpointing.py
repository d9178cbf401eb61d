"""Saving and resuming a training run across its ranks: which rank writes what, and every rank learning of every
failure. checkpoint.py owns the files; this module owns the choreography.

A save: every rank's RNG state is gathered; rank 0 opens a staging folder next to the checkpoint; every rank writes
its own files into it (the optimizer slices at ZeRO stages 1-2); rank 0 writes the weights, config, tokenizer and
training state, then the manifest, and renames the folder into place. A failure anywhere (an OSError, a CUDA out of
memory, a zip writer error) reaches every rank, which raises the same one-line UserError; the staging folder is
removed and the checkpoints before it stay.

A resume: rank 0 reads the weights and the training state (at stage 0 with the optimizer state) and broadcasts
them; the progress, the RNG states and the loss scale reach every rank; at stages 1-2 every rank reads its own
optimizer ranges from all the slices, resharded when the world size changed.
"""
from __future__ import annotations

import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hvd_llama.cli import UserError
from hvd_llama.config import Config
from hvd_llama.lora import load_lora_state_dict, lora_state_dict
from hvd_llama.procs import show
from hvd_llama.training.faults import Fault
from hvd_llama.training.optim import LossScaler
from hvd_llama.weights import checkpoint


@dataclass
class Progress:
    """Where training stands; saved in checkpoints so a resumed run continues exactly."""
    step: int = 0  # optimizer steps completed
    samples: int = 0  # items of the job's SampleOrder read, all ranks together (the data position)
    tokens: int = 0  # tokens trained on, all ranks together
    elapsed_s: float = 0.0  # training wall time, summed over resumed sessions
    world_size: int = 1  # ranks of the session that saved it


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain values (a checkpoint loads without unpickling objects).
    CUDA: its own device's only (each rank pins one GPU, and the process that resumes may see fewer devices);
    none when the process does not use CUDA."""
    cuda = torch.cuda.get_rng_state(torch.cuda.current_device()) if torch.cuda.is_initialized() else None
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      cached],
            "python": random.getstate(), "cuda": cuda}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


class Checkpointer:
    """Save and resume one training run on the ranks `ranks`: hvd_llama.parallel (or procs.OneProcess, to save)."""

    def __init__(self, cfg: Config, run_dir: Path, model: torch.nn.Module, optimizer,
                 scaler: Optional[LossScaler], ranks, fault: Fault = Fault()):
        self.cfg, self.run_dir, self.model, self.optimizer = cfg, run_dir, model, optimizer
        self.scaler, self.ranks, self.fault = scaler, ranks, fault
        self.lora = cfg.finetune.lora_rank > 0  # LoRA checkpoints hold the small adapters alone

    # ---- saving ---------------------------------------------------------------------------------------------
    def save(self, progress: Progress) -> Path:
        """Every rank calls this (collectives: the RNG gather, the staging folder, every rank's files)."""
        r = self.ranks
        rngs = r.allgather_object(rng_state(), name="ckpt.rng")
        path = self.run_dir / "checkpoints" / checkpoint.checkpoint_name(progress.step)
        staging = Path(r.broadcast_object(r.run_on_main(lambda: str(checkpoint.begin_checkpoint(path)),
                                                        name="ckpt.begin"), name="ckpt.staging"))
        parts = r.allgather_object(self._write_own(staging, progress.step), name="ckpt.parts")
        return r.run_on_main(lambda: self._finish(path, staging, parts, rngs, progress), name="ckpt")

    def _write_own(self, staging: Path, step: int) -> tuple[dict, Optional[str]]:
        """This rank's own files ({name: sha256}) and its error, if any: every error is caught, so that every
        rank reaches the gather that tells them all (the run dir must be on a filesystem all ranks share)."""
        rank = self.ranks.rank()
        try:
            self.fault.in_save(step, rank)
            if not self.optimizer.stage:
                return {}, None
            name = checkpoint.slice_name(rank, self.ranks.size())
            return {name: checkpoint.write_torch(staging / name, self.optimizer.state_dict())}, None
        except Exception as err:  # noqa: BLE001 (any failure must reach every rank)
            return {}, f"rank {rank}: {type(err).__name__}: {err}"

    def _finish(self, path: Path, staging: Path, parts: list, rngs: list, progress: Progress) -> Path:
        """Rank 0: the shared files, the manifest and the rename; a UserError naming the first failure."""
        try:
            errors = [error for _, error in parts if error]
            if errors:
                raise RuntimeError(errors[0])
            written = {name: digest for files, _ in parts for name, digest in files.items()}
            checkpoint.save_checkpoint(path, self._weights(), self.cfg.to_dict(),
                                       tokenizer_path=Path(self.cfg.data.dir) / checkpoint.TOKENIZER_FILE,
                                       train_state=self._train_state(rngs, progress), step=progress.step,
                                       weights_file=checkpoint.ADAPTER_FILE if self.lora else checkpoint.MODEL_FILE,
                                       staging=staging, written=written)
        except Exception as err:  # noqa: BLE001 (a CUDA OOM is a RuntimeError: it must not leave the others waiting)
            shutil.rmtree(staging, ignore_errors=True)
            previous = checkpoint.find_latest_checkpoint(self.run_dir)
            raise UserError(f"writing checkpoint {path.name} failed ({err}); the last good checkpoint, "
                            f"{previous or 'none'}, is intact") from None
        checkpoint.prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep)
        return path

    def _weights(self) -> Optional[dict]:
        """The weights as the model holds them (fp32, or bf16 with bf16 weights: widening them would only add
        zeros, and a whole-model fp32 copy on the device). torch.save copies one tensor at a time to host memory.
        None at ZeRO stage 3: every rank's slice of the weights is in its optimizer slice."""
        if self.optimizer.stage == 3:
            return None
        return lora_state_dict(self.model) if self.lora else self.model.state_dict()

    def _train_state(self, rngs: list, progress: Progress) -> dict:
        state = {"progress": asdict(progress), "rng": rngs, "zero_stage": self.optimizer.stage,
                 "scaler": self.scaler.state_dict() if self.scaler else None}
        if self.optimizer.stage == 0:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    # ---- resuming -------------------------------------------------------------------------------------------
    def resume(self, resume: Optional[str]) -> Optional[Progress]:
        """Load `resume` ('auto' or a path; None: a fresh start) on every rank and return its progress (None when
        there is nothing to resume). Every rank starts from rank 0's weights (and stage-0 optimizer state), also on
        a fresh start."""
        r = self.ranks
        state = r.run_on_main(lambda: self._load_on_main(resume), name="resume") if resume else None
        shared = r.broadcast_object({k: state[k] for k in ("path", "progress", "rng", "scaler")} if state else None,
                                    name="resume.state")
        r.broadcast_state(self.model, self.optimizer, shared is not None)
        if shared is None:
            return None
        if self.optimizer.stage:
            self.optimizer.load_state_dict(checkpoint.read_optimizer_slices(Path(shared["path"])))
        if self.optimizer.stage == 3 and not self.optimizer.weights_loaded:  # a checkpoint of stage 1 or 2
            self._load_weight_pieces(Path(shared["path"]))
        if self.scaler and shared["scaler"]:  # every rank scales its loss by the same factor
            self.scaler.load_state_dict(shared["scaler"])
        rng = shared["rng"]
        set_rng_state(rng[r.rank()] if r.rank() < len(rng) else rng[0])
        progress = Progress(**shared["progress"])
        if progress.world_size != r.size() and r.is_main():
            show(f"resuming a run saved on {progress.world_size} rank(s) on {r.size()}: the data continues "
                 f"at item {progress.samples:,} of the global sample order")
        progress.world_size = r.size()
        return progress

    def _load_weight_pieces(self, path: Path) -> None:
        """ZeRO stage 3 resuming a checkpoint of stages 1-2: this rank's pieces of the weights of its model.pt
        (or adapter.pt), memory-mapped: the pages of the pieces it keeps are all it reads."""
        weights = checkpoint.read_adapters(path) if self.lora else checkpoint.read_model_checkpoint(path)[0]
        shards = self.optimizer.shards
        for i, name in enumerate(shards.names):
            if name in weights:
                shards.load(i, weights[name])

    def _load_on_main(self, resume: str) -> Optional[dict]:
        path = checkpoint.find_latest_checkpoint(self.run_dir) if resume == "auto" else \
            checkpoint.resolve_checkpoint(resume)
        if path is None:
            return None
        show(f"resuming from {path}")
        state = checkpoint.load_train_state(path)
        saved_stage, stage = state.get("zero_stage", 0), self.optimizer.stage
        if (saved_stage == 0) != (stage == 0):
            raise UserError(f"{path} was written at dist.zero_stage={saved_stage}; resume it with --set "
                            f"dist.zero_stage={saved_stage}{' (or the other sharded stage)' if saved_stage else ''}")
        if stage != 3:  # at stage 3 every rank reads its own slices of the weights (resume)
            if self.lora:  # the base weights came from finetune.init_from
                load_lora_state_dict(self.model, checkpoint.read_adapters(path))
            else:
                self.model.load_state_dict(checkpoint.read_model_checkpoint(path)[0])  # verified when found
        if stage == 0:
            self.optimizer.load_state_dict(state["optimizer"])
        return {**state, "path": str(path)}
