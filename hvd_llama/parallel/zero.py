"""Data-parallel optimizers behind one interface: replicated (stage 0) and ZeRO-sharded (stages 1 and 2).

Stage 0 is hvd.DistributedOptimizer: every rank holds all gradients and the whole AdamW state. Stages 1 and 2
follow ZeRO (Rajbhandari et al. 2020) in the layout of Megatron-LM's distributed optimizer and DeepSpeed's
stage_1_and_2.py: the trainable parameters, in model order, form one flat index space cut into buckets (whole
parameters, about `bucket_elements` each); every bucket is padded to a multiple of the world size N and rank r
owns its r-th contiguous 1/N. A rank keeps the averaged gradients (fp32, or bf16 with bf16 weights), AdamW
moments (and, for bf16 weights, the fp32 master weights) for its slices only: ceil(P/N) elements plus under N of
padding per bucket. Gradients are accumulated and reduced in fp32 (Horovod has no bfloat16).

    stage 1: backward fills param.grad as usual; reduce_gradients() copies each bucket into a flat fp32 buffer
             and reduce-scatters it (op=Average).
    stage 2: a post-accumulate-grad hook per parameter; on the last of `grad_accum` backward passes (counted
             per parameter, as hvd.DistributedOptimizer's backward_passes_per_step does) a bucket whose
             parameters are all done is copied into a flat fp32 buffer, its param.grad freed, and its
             reduce-scatter launched while backward goes on. reduce_gradients() waits for them.
    grad_accum > 1, either stage: every backward pass's hook adds param.grad into its bucket's flat fp32 buffer
             and frees it (Megatron-LM's main_grad), so bf16 weights' gradients are not summed in bf16 as
             autograd would; that buffer is then reduced itself, with no copy.

Under Gloo each bucket's "reduce-scatter" is an in-place allreduce of which the rank keeps its slice (see
allreduce_beats_reducescatter). Then clip_grad_norm_ takes the global norm (squared slice norms summed over
ranks; padding is zero), step() runs torch.optim.AdamW on per-parameter views of the owned slices (the same math
as stage 0, weight decay on the decay group's pieces only) and all-gathers every bucket's updated slices back
into the parameters.

Both follow the DataParallelOptimizer protocol (training/optim.py), which shows one training step.

Horovod 0.28.1 has no bfloat16 in any op: gradients travel as fp32 (or fp16 compression) and bf16 weights are
all-gathered bit-exactly as int16. Every rank must run the same steps (hvd.join covers allreduce only).
"""
from __future__ import annotations

import math
from typing import Callable

import horovod.torch as hvd
import torch

from hvd_llama.training.zero_layout import (
    MAX_IN_FLIGHT,
    OPTIONAL_SLICE_TENSORS,
    STATE_FORMAT,
    FlatLayout,
    Piece,
    SliceIndex,
    bucket_size,
    check_slices,
)

IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def allgather_async(tensor: torch.Tensor, name: str) -> Callable[[], torch.Tensor]:
    """hvd.allgather_async that also takes bfloat16 (which no Horovod op has): it travels bit-exactly as int16.
    Returns the wait for the result."""
    wire = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    handle = hvd.allgather_async(wire, name=name)
    return lambda: hvd.synchronize(handle).view(tensor.dtype)


def allgather_tensor(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """hvd.allgather for any dtype, bfloat16 included."""
    return allgather_async(tensor, name)()


def allreduce_beats_reducescatter(device: torch.device) -> bool:
    """Under Gloo, Horovod's reducescatter copies the whole input and runs Gloo's old halving-doubling
    algorithm, set up anew for every call; measured here (2 ranks, 3M and 12.6M fp32 elements) it took 1.4-3x
    as long as an in-place allreduce of the same buffer, so there a bucket is allreduced and the slice kept
    (the same memory: the flat bucket buffer exists either way). MPI and NCCL keep the real reduce-scatter."""
    return hvd.gloo_enabled() and device.type == "cpu"


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class ReplicatedOptimizer:
    """Stage 0: hvd.DistributedOptimizer (allreduce during backward, full AdamW state on every rank)."""

    stage = 0

    def __init__(self, optimizer, model: torch.nn.Module):
        self.optimizer, self.model = optimizer, model  # optimizer: an hvd.DistributedOptimizer

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    def _params(self) -> list:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def reduce_gradients(self) -> None:
        self.optimizer.synchronize()

    @torch.no_grad()
    def scale_gradients(self, factor: float) -> None:
        for p in self._params():
            if p.grad is not None:
                p.grad.mul_(factor)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        limit = max_norm if max_norm > 0 and math.isfinite(max_norm) else math.inf
        return torch.nn.utils.clip_grad_norm_(self._params(), limit)

    def step(self) -> None:
        with self.optimizer.skip_synchronize():  # reduce_gradients() already did
            self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Load a saved AdamW state, keeping this optimizer's own implementation flags: torch takes `fused`,
        `foreach` and `capturable` from the file, so a checkpoint of a CPU (non-fused) run resumed on GPUs would
        leave CPU `step` tensors beside GPU ones, which one Horovod broadcast cannot carry."""
        flags = [{k: g[k] for k in IMPLEMENTATION_FLAGS if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state)
        for group, own in zip(self.optimizer.param_groups, flags):
            group.update(own)
            on_device = group.get("fused") or group.get("capturable")
            for p in group["params"]:
                step = self.optimizer.state.get(p, {}).get("step")
                if step is not None:  # where this implementation keeps it (torch's own rule)
                    self.optimizer.state[p]["step"] = step.to(p.device if on_device else "cpu", torch.float32)

    def state_bytes(self) -> dict:
        """Bytes this rank holds now: all weights, the gradients allocated, the AdamW state (moments and the
        step counters)."""
        moments = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return {"weights": _tensor_bytes(self.model.parameters()),
                "gradients": _tensor_bytes(p.grad for p in self._params() if p.grad is not None),
                "optimizer": _tensor_bytes(moments)}


# ---- stages 1 and 2 -------------------------------------------------------------------------------------------
class ShardedOptimizer:
    """ZeRO stage 1 (optimizer state sharded) or 2 (gradients too); see the module docstring.

    Build it after the model has its final dtype and device (it keeps views into the parameters' storage).
    With bf16/fp16 weights the fp32 master copy of the own slices is taken from the parameters at the first
    step() (after any broadcast or weight loading), unless load_state_dict() supplied one.
    """

    def __init__(self, model: torch.nn.Module, param_groups: list[dict], optim_kwargs: dict, stage: int,
                 grad_accum: int, compression=hvd.Compression.none, gradient_predivide_factor: float = 1.0,
                 fused: bool = False, bucket_elements: int = 0):
        if stage not in (1, 2, 3):
            raise ValueError(f"ShardedOptimizer is for ZeRO stages 1 to 3, got {stage}")
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be at least 1, got {grad_accum}")
        self.stage, self.model, self.grad_accum = stage, model, grad_accum
        self.compression, self.predivide = compression, gradient_predivide_factor
        grouped = {id(p) for group in param_groups for p in group["params"]}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in grouped]
        if len(named) != len(grouped):
            raise ValueError("param_groups hold tensors that are not parameters of the model")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) > 1:
            raise ValueError(f"trainable parameters of one dtype expected, got {sorted(map(str, dtypes))}")
        self.dtype = self.params[0].dtype if self.params else torch.float32
        device = self.params[0].device if self.params else torch.device("cpu")
        numels = [p.numel() for p in self.params]
        self.layout = self._make_layout(numels, bucket_elements)
        fp32 = dict(dtype=torch.float32, device=device)
        n = self.layout.shard_numel
        self.exp_avg, self.exp_avg_sq = (torch.zeros(n, **fp32) for _ in range(2))
        self.master = torch.zeros(n, **fp32) if self.dtype != torch.float32 else None
        # The averaged gradient slice in the weights' precision when they are bf16 (ZeRO's 2 + 14/N bytes per
        # parameter), else fp32: rounded once, after the fp32 accumulation and reduction. Kept in fp32 it moved
        # a bf16 run no closer to stage 0 (README "Sharding") and costs 2/N bytes per parameter more.
        grad_dtype = torch.bfloat16 if self.dtype == torch.bfloat16 and stage < 3 else torch.float32
        self.grad_shard = torch.zeros(n, dtype=grad_dtype, device=device)
        self.scatter_by_allreduce = allreduce_beats_reducescatter(device)
        self._master_ready = False
        # What AdamW updates: the own part of each parameter, in its storage (fp32) or in the master copy.
        self._param_views = self._own_views()
        targets = self._param_views if self.master is None else \
            [self.master[pc.shard_offset:pc.shard_offset + pc.numel] for pc in self.layout.pieces]
        self.optimizer = torch.optim.AdamW(self._inner_groups(param_groups, targets), **optim_kwargs,
                                           fused=fused or None)
        for view, pc in zip(targets, self.layout.pieces):
            self.optimizer.state[view] = self._fresh_state(view, pc, fused)
        self._targets = targets
        self._in_flight: list = []  # (bucket index, handle, compression context)
        self._accum: dict[int, torch.Tensor] = {}  # bucket index: fp32 sum of this step's passes (grad_accum > 1)
        self._reset_backward()
        self._hook_handles = [p.register_post_accumulate_grad_hook(self._make_hook(i))
                              for i, p in enumerate(self.params)] if stage >= 2 or grad_accum > 1 else []

    def _make_layout(self, numels: list[int], bucket_elements: int) -> FlatLayout:
        return FlatLayout(numels, hvd.size(), hvd.rank(), bucket_size(sum(numels), bucket_elements))

    def _own_views(self) -> list[torch.Tensor]:
        """This rank's piece of each parameter, as the model holds it (stages 1-2: in the parameter's storage)."""
        return [self.params[pc.index].detach().view(-1)[pc.start:pc.end] for pc in self.layout.pieces]

    def _inner_groups(self, param_groups: list[dict], targets: list) -> list[dict]:
        """The caller's groups (weight decay, lr) holding the views of their parameters' pieces."""
        index = {id(p): i for i, p in enumerate(self.params)}
        groups = []
        for group in param_groups:
            members = {index[id(p)] for p in group["params"]}
            views = [v for v, pc in zip(targets, self.layout.pieces) if pc.index in members]
            groups.append({**group, "params": views})
        return groups

    def _fresh_state(self, view: torch.Tensor, piece: Piece, fused: bool) -> dict:
        """AdamW's state for one piece, allocated up front as views of the flat moment shards (so state_bytes is
        exact before the first step and state_dict is a slice); step on the CPU unless fused, as torch does."""
        span = slice(piece.shard_offset, piece.shard_offset + piece.numel)
        step = torch.zeros((), device=view.device) if fused else torch.tensor(0.0)
        return {"step": step, "exp_avg": self.exp_avg[span], "exp_avg_sq": self.exp_avg_sq[span]}

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    # ---- gradients: reduce-scatter bucket by bucket --------------------------------------------------------
    def _reset_backward(self) -> None:
        """Before a step's first backward pass: nothing counted, no bucket launched (`launched`: how many)."""
        self._passes = [0] * len(self.params)
        self._waiting = [b.last - b.first for b in self.layout.buckets]
        self.launched = 0
        self.passes = 0  # backward passes reduced so far this step (stage 3 reduces each one: names differ)

    def _make_hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            self._passes[index] += 1
            if self._passes[index] > self.grad_accum:
                raise RuntimeError(f"more than grad_accum={self.grad_accum} backward passes before "
                                   "reduce_gradients()")
            if self.grad_accum > 1:
                self._accumulate(index, param)
            if self.stage == 1 or self._passes[index] < self.grad_accum:
                return  # accumulate locally, like backward_passes_per_step; stage 1 reduces in reduce_gradients()
            self._gradient_done(index)
        return hook

    def _gradient_done(self, index: int) -> None:
        """Parameter `index` has its gradient: launch every bucket, in order, whose parameters all have theirs."""
        bucket = self.layout.bucket_of[index]
        self._waiting[bucket] -= 1
        # Launch in bucket order only: every rank then submits the same sequence, so waiting on the
        # oldest in-flight bucket can never deadlock against another rank.
        while self.launched < len(self._waiting) and self._waiting[self.launched] == 0:
            self._launch(self.launched)

    def _flat_zeros(self, b: int) -> torch.Tensor:
        """A zeroed fp32 buffer of bucket b, padding included."""
        return torch.zeros(self.layout.buckets[b].shard_numel * self.layout.world, dtype=torch.float32,
                           device=self.grad_shard.device)

    @torch.no_grad()
    def _accumulate(self, index: int, param: torch.Tensor) -> None:
        """Add this backward pass's gradient of parameter `index` into its bucket's fp32 buffer, and free it."""
        b = self.layout.bucket_of[index]
        if b not in self._accum:
            self._accum[b] = self._flat_zeros(b)
        offset = self.layout.starts[index] - self.layout.buckets[b].global_start
        self._accum[b][offset:offset + param.numel()].add_(param.grad.reshape(-1))
        param.grad = None

    @torch.no_grad()
    def _bucket_gradients(self, b: int) -> torch.Tensor:
        """Bucket b's gradients in one flat fp32 buffer: the micro-steps' sum accumulated in it, or (one backward
        pass) param.grad copied in; an unused parameter's count as zero."""
        flat = self._accum.pop(b, None)
        if flat is not None:
            return flat
        bucket, flat = self.layout.buckets[b], self._flat_zeros(b)
        for i in range(bucket.first, bucket.last):
            p, offset = self.params[i], self.layout.starts[i] - bucket.global_start
            if p.grad is not None:
                flat[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
            if self.stage >= 2:
                p.grad = None  # the bucket buffer holds it now; after the scatter only our slice stays
        return flat

    @torch.no_grad()
    def _launch(self, b: int) -> None:
        wire, ctx = self.compression.compress(self._bucket_gradients(b))
        # Scaled after compressing, as Horovod's prescale_factor does in stage 0, so the fp16 wire rounds the
        # same way; never prescale_factor itself: it fails above HOROVOD_FUSION_THRESHOLD.
        if self.predivide != 1.0:
            wire.mul_(1.0 / self.predivide)
        if self.scatter_by_allreduce:  # in place: no buffer beyond the flat one; the slice is taken after
            handle = hvd.allreduce_async_(wire, name=f"zero.grad.{b}.{self.passes}", op=hvd.Average,
                                          postscale_factor=self.predivide)
        else:
            handle = hvd.reducescatter_async(wire, name=f"zero.grad.{b}.{self.passes}", op=hvd.Average,
                                             postscale_factor=self.predivide)
        self._in_flight.append((b, handle, ctx))
        self.launched = b + 1
        while len(self._in_flight) > MAX_IN_FLIGHT:
            self._finish_oldest()

    @torch.no_grad()
    def _finish_oldest(self) -> None:
        b, handle, ctx = self._in_flight.pop(0)
        bucket = self.layout.buckets[b]
        reduced = self.compression.decompress(hvd.synchronize(handle), ctx)
        if self.scatter_by_allreduce:
            own = self.layout.rank * bucket.shard_numel
            reduced = reduced[own:own + bucket.shard_numel]
        assert reduced.numel() == bucket.shard_numel, (reduced.shape, bucket.shard_numel)
        self._keep_slice(self.grad_shard[bucket.shard_offset:bucket.shard_offset + bucket.shard_numel], reduced)

    @staticmethod
    def _keep_slice(own: torch.Tensor, reduced: torch.Tensor) -> None:
        own.copy_(reduced)  # one reduction per step (stage 3 reduces every backward pass and adds them up)

    def reduce_gradients(self) -> None:
        """After the last micro-batch's backward: this rank's slice of the averaged gradients is ready."""
        while self.launched < len(self.layout.buckets):
            self._launch(self.launched)  # stage 1: all of them; stage 2: buckets with unused parameters
        while self._in_flight:
            self._finish_oldest()
        self._reset_backward()

    @torch.no_grad()
    def scale_gradients(self, factor: float) -> None:
        self.grad_shard.mul_(factor)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The global norm of the averaged gradients (inf/nan on every rank if any is); clip to max_norm as
        torch.nn.utils.clip_grad_norm_ does when max_norm is positive and finite."""
        local = torch.linalg.vector_norm(self.grad_shard, dtype=torch.float32).double().square().cpu()
        total = hvd.allreduce(local.reshape(1), op=hvd.Sum, name="zero.grad_norm").sqrt()
        norm = total.to(torch.float32).reshape(())
        if max_norm > 0 and math.isfinite(max_norm) and torch.isfinite(norm):
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            self.grad_shard.mul_(coef.to(self.grad_shard.device))
        return norm

    # ---- the update ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        if self.master is not None and not self._master_ready:
            for master, param in zip(self._targets, self._param_views):
                master.copy_(param)
            self._master_ready = True
        # AdamW takes gradients of its parameters' dtype: a bf16 slice is widened for the step only.
        grads = self.grad_shard.float()
        for target, pc in zip(self._targets, self.layout.pieces):
            target.grad = grads[pc.shard_offset:pc.shard_offset + pc.numel]
        self.optimizer.step()
        for target in self._targets:
            target.grad = None
        if self.master is not None:
            for param, master in zip(self._param_views, self._targets):
                param.copy_(master)  # rounded to the model's dtype
        self._publish()

    def _publish(self) -> None:
        """Stages 1-2: every rank's updated slices into every rank's parameters (stage 3 gathers them lazily)."""
        self._allgather_params()

    @torch.no_grad()
    def _allgather_params(self) -> None:
        """Every rank's updated slices into every rank's parameters, bucket by bucket with up to MAX_IN_FLIGHT
        all-gathers outstanding: hvd.allgather allocates each whole bucket, and waiting for one at a time would
        cost a cycle of Horovod's background loop per bucket."""
        pending = []
        for b, bucket in enumerate(self.layout.buckets):
            send = torch.zeros(bucket.shard_numel, dtype=self.dtype, device=self.grad_shard.device)
            for pc in bucket.pieces:
                at = pc.shard_offset - bucket.shard_offset
                send[at:at + pc.numel].copy_(self.params[pc.index].detach().view(-1)[pc.start:pc.end])
            pending.append((bucket, allgather_async(send, name=f"zero.param.{b}")))
            if len(pending) > MAX_IN_FLIGHT:
                self._unpack(*pending.pop(0))
        for bucket, wait in pending:
            self._unpack(bucket, wait)

    @torch.no_grad()
    def _unpack(self, bucket, wait: Callable[[], torch.Tensor]) -> None:
        full = wait()
        for i in range(bucket.first, bucket.last):
            offset = self.layout.starts[i] - bucket.global_start
            self.params[i].detach().view(-1).copy_(full[offset:offset + self.params[i].numel()])

    def zero_grad(self) -> None:
        if self._in_flight:
            raise RuntimeError("zero_grad() while gradient reduce-scatters are in flight: call "
                               "reduce_gradients() after the last backward pass first")
        for p in self.params:
            p.grad = None
        self._accum.clear()
        self._reset_backward()

    # ---- state ---------------------------------------------------------------------------------------------
    def _step_count(self) -> int:
        steps = {int(s["step"].item()) for s in self.optimizer.state.values()}
        return steps.pop() if steps else 0  # one value: every piece steps together

    def state_dict(self) -> dict:
        """This rank's slice, independent of world size and bucket size: the owned runs of the flat unpadded
        index space (trainable parameters in model order) as `ranges` (global_start, global_end) at `offsets` in
        the slice's tensors, which are this rank's flat shards themselves (no copy: saving a checkpoint allocates
        nothing), and the AdamW step count. `params` (names, shapes) defines the space."""
        runs = self.layout.own_runs()
        return {"format": STATE_FORMAT, "params": [(n, tuple(p.shape)) for n, p in zip(self.names, self.params)],
                "ranges": [(start, end) for start, end, _ in runs], "offsets": [offset for _, _, offset in runs],
                "step": self._step_count(),
                **{name: t for name, t in self._slice_tensors().items() if name != "master" or self._master_ready}}

    def _slice_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's slice tensors, by their names in a checkpoint's slice files."""
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq,
                **({"master": self.master} if self.master is not None else {})}

    @torch.no_grad()
    def load_state_dict(self, slices) -> set[str]:
        """Load this rank's slice from the slice dicts of ALL ranks of a checkpoint saved at any world size (a
        single dict is taken as a list of one); returns the names of the slice tensors filled. Without master
        weights in them, they come from the parameters."""
        slices = check_slices(slices if isinstance(slices, (list, tuple)) else [slices], self._layout_key())
        index = SliceIndex(slices)
        tensors = {name: t for name, t in self._slice_tensors().items()
                   if name not in OPTIONAL_SLICE_TENSORS or index.holds(name)}
        for start, end, offset in self.layout.own_runs():
            for name, tensor in tensors.items():
                tensor[offset:offset + end - start].copy_(index.read(name, start, end))
        for s in self.optimizer.state.values():
            s["step"].fill_(index.step)
        self._master_ready = "master" in tensors
        return set(tensors)

    def _layout_key(self) -> list:
        return [(n, tuple(p.shape)) for n, p in zip(self.names, self.params)]

    def state_bytes(self) -> dict:
        """Bytes this rank holds now: all weights; gradients (this rank's slice plus any param.grad allocated:
        stage 1 keeps them until zero_grad(), stage 2 frees them as their bucket is reduced; with grad_accum > 1
        the fp32 accumulation buffers instead, until their bucket is reduced); optimizer (moments and master
        weights of the slice)."""
        optimizer = [self.exp_avg, self.exp_avg_sq] + ([self.master] if self.master is not None else [])
        return {"weights": _tensor_bytes(self.model.parameters()),
                "gradients": _tensor_bytes([self.grad_shard, *self._accum.values()]
                                           + [p.grad for p in self.params if p.grad is not None]),
                "optimizer": _tensor_bytes(optimizer)}
