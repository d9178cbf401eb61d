"""ZeRO stage 3 on Horovod: every rank keeps only its 1/N of every parameter, gathered for the moment it computes.

The model is cut into units (Megatron-FSDP's and FSDP2's "all-gather groups"): each transformer block, the token
embedding, and the final norm with the output head. Every unit's parameters form buckets of the flat layout of
stages 1-2 (training/zero_layout.py): the trainable ones one bucket of the trainable index space (the optimizer's,
whose slices checkpoints store), the frozen ones (LoRA's base) one bucket of a frozen space; rank r keeps the
r-th 1/N of each, persistently, in the weights' dtype. The optimizer (FullyShardedOptimizer) keeps the same
slices of the gradients (fp32), AdamW's moments and, for bf16 weights, the fp32 master copy.

    forward   a unit's first module call waits for its all-gather (one flat hvd.allgather of the rank's slices;
              bf16 travels as int16) and issues the next `prefetch` units' gathers, so that they travel while this
              one computes; a block frees its weights when its forward returns. The embedding and the head stay
              gathered until the end of backward (FSDP2 does not reshard its root after forward either).
    backward  a hook on a block's output gathers it again (activation checkpointing's recompute finds it there)
              and issues the gathers of the blocks before it; an autograd function on the block's input frees it
              once its backward is done. As each unit's gradients are complete, the optimizer reduce-scatters them
              (fp32, op=Average) into its gradient slice, adding up `grad_accum` backward passes.
    step      AdamW on the rank's slices, as at stages 1-2; no all-gather: the next forward gathers.

Freeing is storage resizing (as FSDP2 does): the parameters are views of a unit's full buffer whose storage is
resized to 0, so the tensors autograd saved (views of the weights) free their memory too, and see the weights
again when the storage is refilled. Every rank issues the same gathers and reductions in the same order, under
names per unit and occurrence.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import horovod.torch as hvd
import torch
from torch import nn

from hvd_llama.parallel.zero import ShardedOptimizer, _tensor_bytes, allgather_async
from hvd_llama.training.zero_layout import (
    Bucket,
    FlatLayout,
    own_widths,
    transformer_units,
    unit_layouts,
    unit_of_parameters,
)


@dataclass
class Unit:
    """One all-gather group: the parameters of `modules`, gathered whole before they compute."""
    index: int
    name: str
    modules: list
    sticky: bool  # stays gathered from its first use until the end of backward (the embedding, the head)
    t: Optional[Bucket] = None  # its bucket of the trainable layout (None: no trainable parameter)
    f: Optional[Bucket] = None  # of the frozen layout
    full: list = field(default_factory=list)  # the full buffers the parameters are views of: trainable, frozen
    wait: Optional[Callable[[], torch.Tensor]] = None  # an all-gather in flight
    ready: bool = False
    in_backward: bool = False
    gathers: int = 0

    @property
    def widths(self) -> tuple[int, int]:
        """This rank's elements of the unit: trainable, frozen."""
        return own_widths((self.t, self.f))


class PostBackward(torch.autograd.Function):
    """Identity on a unit's input whose backward runs once the unit's backward is done: frees it."""

    @staticmethod
    def forward(ctx, shards: "ShardedParameters", unit: Unit, x: torch.Tensor) -> torch.Tensor:
        ctx.shards, ctx.unit = shards, unit
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.unit.in_backward = False
        ctx.shards.free(ctx.unit)
        return None, None, grad


class ShardedParameters:
    """Every parameter of `model` (built on the meta device) as this rank's slices, per unit; the module hooks that
    gather a unit for its forward and backward and free it after. Build the optimizer on it afterwards."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, prefetch: int = 1):
        self.model, self.device, self.dtype, self.prefetch = model, device, dtype, prefetch
        self.world, self.rank = hvd.size(), hvd.rank()
        spec = transformer_units(model)
        self.units = [Unit(i, name, modules, sticky) for i, (name, modules, sticky) in enumerate(spec)]
        named = list(model.named_parameters())  # a tied parameter once, where model order first meets it
        self.names, self.shapes = [n for n, _ in named], [tuple(p.shape) for _, p in named]
        unit_of = unit_of_parameters(named, spec)
        self.layout = unit_layouts([p.numel() for _, p in named], [p.requires_grad for _, p in named], unit_of,
                                   self.world, self.rank)
        self.position = self.layout.positions()  # model-order index -> (kind, index among that kind)
        self.layouts = self.layout.layouts
        for unit in self.units:
            unit.t, unit.f = self.layout.unit_buckets(unit.index)
        self.shards = [torch.zeros(layout.shard_numel, dtype=dtype, device=device) for layout in self.layouts]
        self.params = self._materialise(named, unit_of)
        self.on_backward_end: list[Callable[[], None]] = []  # the optimizer's end of a backward pass
        self._backward_started = False
        self._register_hooks()

    # ---- layout ------------------------------------------------------------------------------------------------
    def _materialise(self, named: list, unit_of: list[int]) -> list[nn.Parameter]:
        """Replace every parameter by one on this rank's device that is a view of its unit's full buffer, unit by
        unit, each buffer's storage freed before the next is allocated: views made once, valid whenever the
        buffer is gathered."""
        new: dict[int, nn.Parameter] = {}
        for unit in self.units:
            unit.full = [torch.empty(width * self.world, dtype=self.dtype, device=self.device)
                         for width in unit.widths]
            for i in (i for i, u in enumerate(unit_of) if u == unit.index):
                kind, local = self.position[i]
                at = self.layouts[kind].starts[local] - (unit.t, unit.f)[kind].global_start
                param = named[i][1]
                # A version counter of its own (not the buffer's, which every refill bumps): what autograd saved
                # of the weights in forward is still valid when backward refills the storage.
                new[id(param)] = nn.Parameter(torch.empty(0, dtype=self.dtype, device=self.device),
                                              requires_grad=param.requires_grad)
                new[id(param)].data = unit.full[kind][at:at + param.numel()].view(self.shapes[i])
            self.free(unit)
        for module in self.model.modules():  # tied parameters stay one parameter
            for key, param in module._parameters.items():
                if param is not None:
                    module._parameters[key] = new[id(param)]
        return [new[id(p)] for _, p in named]

    def pieces(self, i: int) -> list[tuple[int, int, torch.Tensor]]:
        """(start, end, view into this rank's shard) of every piece of parameter i (flattened) that it owns."""
        kind, local = self.position[i]
        return [(pc.start, pc.end, self.shards[kind][pc.shard_offset:pc.shard_offset + pc.numel])
                for pc in self.layouts[kind].pieces if pc.index == local]

    @torch.no_grad()
    def load(self, i: int, value: torch.Tensor) -> None:
        """Parameter i's own pieces from `value`, the whole parameter (any dtype and device; e.g. memory-mapped)."""
        flat = value.reshape(-1)
        for start, end, own in self.pieces(i):
            own.copy_(flat[start:end])

    # ---- gather and free ---------------------------------------------------------------------------------------
    def issue(self, unit: Unit) -> None:
        """Start the unit's all-gather, unless it is gathered or on its way."""
        if unit.ready or unit.wait is not None:
            return
        t, f = unit.widths
        send = self.shards[0][unit.t.shard_offset:unit.t.shard_offset + t] if t else None
        if f:
            frozen = self.shards[1][unit.f.shard_offset:unit.f.shard_offset + f]
            send = frozen if send is None else torch.cat([send, frozen])
        unit.gathers += 1
        unit.wait = allgather_async(send, name=f"zero3.gather.{unit.index}.{unit.gathers}")

    @torch.no_grad()
    def gather(self, unit: Unit) -> None:
        """The unit's full weights in its buffers (waiting for its all-gather, issued now if it was not)."""
        if unit.ready:
            return
        self.issue(unit)
        rows = unit.wait().view(self.world, -1)  # rank-major: each rank's [trainable | frozen] slices
        unit.wait, at = None, 0
        for full, width in zip(unit.full, unit.widths):
            if width:
                full.untyped_storage().resize_(full.numel() * full.element_size())
                full.view(self.world, width).copy_(rows[:, at:at + width])
            at += width
        unit.ready = True

    def free(self, unit: Unit) -> None:
        for full in unit.full:
            full.untyped_storage().resize_(0)
        unit.ready = False

    def prefetch_after(self, unit: Unit, order: list[Unit]) -> None:
        """Issue the gathers of the `prefetch` units after `unit` in `order`."""
        at = order.index(unit)
        for nxt in order[at + 1:at + 1 + self.prefetch]:
            self.issue(nxt)

    # ---- hooks -------------------------------------------------------------------------------------------------
    def _register_hooks(self) -> None:
        blocks = [u for u in self.units if not u.sticky]
        self.forward_order = self.units
        self.backward_order = blocks[::-1]
        for unit in self.units:
            for module in unit.modules:
                module.register_forward_pre_hook(self._pre_forward(unit))
            if not unit.sticky:
                unit.modules[-1].register_forward_hook(self._post_forward(unit))

    def _pre_forward(self, unit: Unit):
        def hook(module, args):
            if unit.in_backward:  # activation checkpointing's recompute: gathered by the backward hook
                return None
            self.gather(unit)
            self.prefetch_after(unit, self.forward_order)
            x = args[0] if args else None
            if unit.sticky or not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad):
                return None
            return (PostBackward.apply(self, unit, x), *args[1:])
        return hook

    def _post_forward(self, unit: Unit):
        def hook(module, args, output):
            if unit.in_backward:
                return None
            self.free(unit)
            if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad: self._pre_backward(unit))
            return None
        return hook

    def _pre_backward(self, unit: Unit) -> None:
        if not self._backward_started:
            self._backward_started = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)
        unit.in_backward = True
        self.gather(unit)
        self.prefetch_after(unit, self.backward_order)

    def _backward_end(self) -> None:
        """After a backward pass: the sticky units go (they are gathered again by the next forward), and so does
        any gather still in flight: the optimizer's step is about to change the slices it carries."""
        self._backward_started = False
        for unit in self.units:
            unit.in_backward = False
            if unit.wait is not None:  # a prefetch no unit used: let it finish, its rows are not wanted
                unit.wait()
                unit.wait = None
            if unit.ready:
                self.free(unit)
        for callback in self.on_backward_end:
            callback()

    def state_bytes(self) -> int:
        """Weights this rank holds now: its slices, and the units gathered."""
        return _tensor_bytes(self.shards) + sum(f.untyped_storage().nbytes() for u in self.units for f in u.full)


class FullyShardedOptimizer(ShardedOptimizer):
    """ZeRO stage 3's optimizer: stages 1-2's slices of the trainable layout of `shards`, whose own pieces of the
    weights are in the shards (not in the parameters); every backward pass's gradients reduced as each unit's
    are complete and added to the fp32 gradient slice (so grad_accum passes never hold the whole gradients)."""

    def __init__(self, model: nn.Module, shards: ShardedParameters, param_groups: list[dict], optim_kwargs: dict,
                 **options):
        self.shards = shards
        super().__init__(model, param_groups, optim_kwargs, stage=3, **options)
        shards.on_backward_end.append(self._end_pass)

    def _make_layout(self, numels: list[int], bucket_elements: int) -> FlatLayout:
        layout = self.shards.layouts[0]
        assert layout.numels == numels, "the optimizer's parameters are the trainable ones, in model order"
        return layout

    def _own_views(self) -> list[torch.Tensor]:
        shard = self.shards.shards[0]
        return [shard[pc.shard_offset:pc.shard_offset + pc.numel] for pc in self.layout.pieces]

    def _make_hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            self._gradient_done(index)
        return hook

    def _end_pass(self) -> None:
        """A backward pass is over: launch what it left (parameters without gradients count as zero)."""
        while self.launched < len(self.layout.buckets):
            self._launch(self.launched)
        passes = self.passes + 1
        self._reset_backward()
        self.passes = passes

    @staticmethod
    def _keep_slice(own: torch.Tensor, reduced: torch.Tensor) -> None:
        own.add_(reduced)

    def reduce_gradients(self) -> None:
        while self._in_flight:
            self._finish_oldest()
        self._reset_backward()

    def _launch(self, b: int) -> None:
        if not self.grad_shard.untyped_storage().nbytes():  # the step's first reduction: a zeroed gradient slice
            self.grad_shard.untyped_storage().resize_(self.grad_shard.numel() * self.grad_shard.element_size())
            self.grad_shard.zero_()
        super()._launch(b)

    def zero_grad(self) -> None:
        """The gradient slice is freed between steps (FSDP2's set_to_none): at rest a rank holds its weights and
        AdamW's state alone."""
        super().zero_grad()
        self.grad_shard.untyped_storage().resize_(0)

    def _publish(self) -> None:
        pass  # the next forward gathers the updated slices

    def _slice_tensors(self) -> dict[str, torch.Tensor]:
        """Stages 1-2's slice, and this rank's slice of the trainable weights themselves (`param`)."""
        return {**super()._slice_tensors(), "param": self.shards.shards[0]}

    def load_state_dict(self, slices) -> set[str]:
        """Stages 1-2's, and this rank's slices of the weights when the checkpoint holds them (`weights_loaded`;
        a checkpoint of stages 1-2 has them in its model.pt instead)."""
        loaded = super().load_state_dict(slices)
        self.weights_loaded = "param" in loaded
        return loaded

    def state_bytes(self) -> dict:
        grads = [p.grad for p in self.params if p.grad is not None]
        return {**super().state_bytes(), "weights": self.shards.state_bytes(),
                "gradients": self.grad_shard.untyped_storage().nbytes() + _tensor_bytes(grads)}
