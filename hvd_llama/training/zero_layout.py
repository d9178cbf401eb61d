"""The flat layout of ZeRO stages 1 and 2, and the slices it saves: pure arithmetic, no Horovod.

The trainable parameters, in model order, form one flat unpadded index space cut into buckets of whole
parameters; each bucket is padded to a multiple of the world size N and rank r owns its r-th contiguous 1/N.
A rank's optimizer slice is saved as its flat shards with the runs of that index space it owns (global start and
end, and where each run sits in the shards), which does not depend on N or the bucket size: any set of slices that
covers the space can be read at another N.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

DEFAULT_BUCKET_ELEMENTS = 25_000_000
# The default bucket is smaller for small models, so that their gradients span at least this many buckets and
# the reductions overlap backward (on `small`, 12.6M parameters: stage 2 took 1.00x stage 0's step time with
# ~3M-element buckets, 1.04-1.07x with one bucket; README "ZeRO stages").
MIN_BUCKETS = 4
MAX_IN_FLIGHT = 2  # reduce-scatters outstanding at once (a third is launched before the oldest is waited for)
STATE_FORMAT = "hvd_llama.zero_slice/2"
SLICE_TENSORS = ("exp_avg", "exp_avg_sq", "master")
OPTIONAL_SLICE_TENSORS = ("master", "param")  # master: with bf16 weights; param: the weights, at stage 3


# ---- the flat layout (pure arithmetic; no Horovod) ------------------------------------------------------------
@dataclass
class Piece:
    """The part [start, end) of parameter `index` (flattened) that one rank owns."""
    index: int
    start: int
    end: int
    global_start: int  # position in the flat unpadded index space
    shard_offset: int  # position in the rank's flat shard

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass
class Bucket:
    """Consecutive whole parameters [first, last) padded to a multiple of the world size."""
    first: int
    last: int
    global_start: int
    numel: int
    shard_numel: int  # padded numel / world size: every rank's slice of this bucket
    shard_offset: int  # where this rank's slice sits in its flat shard
    pieces: list  # this rank's Pieces, in index order


def bucket_size(trainable: int, configured: int = 0) -> int:
    """dist.zero_bucket_elements, or when it is 0 (the default) DEFAULT_BUCKET_ELEMENTS, capped so that
    `trainable` parameters span at least MIN_BUCKETS buckets."""
    return configured or max(1, min(DEFAULT_BUCKET_ELEMENTS, math.ceil(trainable / MIN_BUCKETS)))


def backward_buckets(numels: Sequence[int], bucket_elements: int) -> list[tuple[int, int]]:
    """Consecutive whole parameters [first, last) of about `bucket_elements` elements each (a larger parameter
    alone), formed from the last parameter backwards: backward produces gradients in that order, so the first
    bucket is ready first."""
    if bucket_elements <= 0:
        raise ValueError(f"bucket_elements must be positive, got {bucket_elements}")
    buckets, last = [], len(numels)
    while last > 0:
        first, size = last, 0
        while first > 0 and (size == 0 or size + numels[first - 1] <= bucket_elements):
            first -= 1
            size += numels[first]
        buckets.append((first, last))
        last = first
    return buckets


class FlatLayout:
    """Buckets over parameters of sizes `numels` (model order) and what rank `rank` of `world` owns.

    Buckets are formed from the last parameter backwards (backward produces gradients in that order, so
    bucket 0 is ready first); bucket order is also the order every rank launches their reduce-scatters in.
    """

    def __init__(self, numels: Sequence[int], world: int, rank: int, bucket_elements: int = 0,
                 bounds: Optional[Sequence[tuple[int, int]]] = None):
        """`bounds`: the buckets' [first, last) parameter ranges in bucket order, instead of buckets of about
        `bucket_elements` (ZeRO stage 3: one bucket per unit's parameters)."""
        self.numels, self.world, self.rank = list(numels), world, rank
        self.starts = [0]
        for n in self.numels:
            self.starts.append(self.starts[-1] + n)
        self.numel = self.starts[-1]
        self.buckets: list[Bucket] = []
        shard_offset = 0
        for first, last in bounds if bounds is not None else backward_buckets(self.numels, bucket_elements):
            bucket = self._bucket(first, last, shard_offset)
            self.buckets.append(bucket)
            shard_offset += bucket.shard_numel
        self.shard_numel = shard_offset
        self.pieces = sorted((p for b in self.buckets for p in b.pieces), key=lambda p: p.global_start)
        self.bucket_of = {i: b for b, bucket in enumerate(self.buckets) for i in range(bucket.first, bucket.last)}

    def _bucket(self, first: int, last: int, shard_offset: int) -> Bucket:
        base = self.starts[first]
        numel = self.starts[last] - base
        shard_numel = -(-numel // self.world)
        own_start = base + self.rank * shard_numel  # in global coordinates; may run past the bucket (padding)
        own_end = own_start + shard_numel
        pieces = []
        for i in range(first, last):
            lo, hi = max(own_start, self.starts[i]), min(own_end, self.starts[i + 1])
            if lo < hi:
                pieces.append(Piece(i, lo - self.starts[i], hi - self.starts[i], lo, shard_offset + lo - own_start))
        return Bucket(first, last, base, numel, shard_numel, shard_offset, pieces)

    def own_runs(self) -> list[tuple[int, int, int]]:
        """(global_start, global_end, shard_offset) of every stretch this rank owns, by global position."""
        runs: list[list[int]] = []
        for p in self.pieces:
            last = runs[-1] if runs else None
            if last and last[1] == p.global_start and last[2] + last[1] - last[0] == p.shard_offset:
                last[1] = p.global_start + p.numel
            else:
                runs.append([p.global_start, p.global_start + p.numel, p.shard_offset])
        return [tuple(r) for r in runs]


# ---- slice dicts: checking, reading ranges, merging ---------------------------------------------------------
def check_slices(slices: list, layout_key: Optional[list] = None) -> list:
    if not slices:
        raise ValueError("no optimizer slices given")
    for s in slices:
        if not isinstance(s, dict) or s.get("format") != STATE_FORMAT:
            raise ValueError("not a sharded optimizer slice (saved at dist.zero_stage=0?); sharded optimizers "
                             "load only the slices saved by sharded optimizers")
    if layout_key is not None and [(n, tuple(shape)) for n, shape in slices[0]["params"]] != layout_key:
        raise ValueError("the optimizer slices were saved for other trainable parameters (names or shapes differ)")
    if len({s["step"] for s in slices}) > 1:
        raise ValueError(f"optimizer slices from different steps: {sorted({s['step'] for s in slices})}")
    return slices


class SliceIndex:
    """Reads any range of the flat index space from a set of slices (as many ranks as saved them)."""

    def __init__(self, slices: list):
        runs = [(start, end, s, offset) for s in slices for (start, end), offset in zip(s["ranges"], s["offsets"])]
        runs.sort(key=lambda run: run[0])
        self.runs, self.starts = runs, [r[0] for r in runs]
        self.step = slices[0]["step"]
        self.held = set.intersection(*(set(s) for s in slices))  # what every slice holds

    def holds(self, name: str) -> bool:
        return name in self.held

    def read(self, name: str, start: int, end: int) -> torch.Tensor:
        parts, at = [], start
        k = max(0, bisect.bisect_right(self.starts, start) - 1)
        while at < end:
            if k >= len(self.runs) or self.runs[k][0] > at or self.runs[k][1] <= at:
                raise ValueError(f"the optimizer slices do not cover elements [{at}, {end}) of the flat index "
                                 "space; are all ranks' slice files there?")
            run_start, run_end, s, offset = self.runs[k]
            stop = min(end, run_end)
            parts.append(s[name][offset + at - run_start:offset + stop - run_start])
            at, k = stop, k + 1
        return torch.cat(parts)

    def parameters(self, params: list, name: str) -> dict:
        """The tensor `name` (exp_avg, master, param, ...) of every parameter of `params` ((name, shape) in the
        index space's order), shaped like it: one tensor read at a time."""
        tensors, start = {}, 0
        for param, shape in params:
            end = start + math.prod(shape)
            tensors[param] = self.read(name, start, end).reshape(shape)
            start = end
        return tensors


def merge_slices(slices: list) -> dict:
    """All ranks' slices into full per-parameter state: {"step", "state": {name: {"exp_avg", "exp_avg_sq"[,
    "master"]} shaped like the parameter}} (for export, or inspecting a checkpoint)."""
    slices = check_slices(list(slices))
    index = SliceIndex(slices)
    names = [n for n in SLICE_TENSORS if n not in OPTIONAL_SLICE_TENSORS or index.holds(n)]
    tensors = {t: index.parameters(slices[0]["params"], t) for t in names}
    return {"step": index.step, "state": {param: {t: tensors[t][param] for t in names}
                                          for param, _ in slices[0]["params"]}}


# ---- ZeRO stage 3: units, and the layouts of their parameters ------------------------------------------------
def transformer_units(model: torch.nn.Module) -> list[tuple[str, list, bool]]:
    """(name, modules, sticky) of hvd_llama's Transformer, in forward order: the embedding, every block, the head
    (the final norm and the output projection). Sticky units stay gathered from their first use to the end of
    backward: the embedding (the head uses it when tied) and the head (called once per loss chunk)."""
    return ([("embedding", [model.tok_embeddings], True)]
            + [(f"block {i}", [layer], False) for i, layer in enumerate(model.layers)]
            + [("head", [model.norm, model.output], True)])


def unit_bounds(unit_of: list[int]) -> tuple[list[tuple[int, int]], dict[int, int]]:
    """Buckets [first, last) of consecutive parameters of one unit, last unit first (backward's order), and each
    unit's bucket index."""
    bounds, bucket_of_unit, last = [], {}, len(unit_of)
    while last > 0:
        first = last
        while first > 0 and unit_of[first - 1] == unit_of[last - 1]:
            first -= 1
        bucket_of_unit[unit_of[last - 1]] = len(bounds)
        bounds.append((first, last))
        last = first
    return bounds, bucket_of_unit


def unit_of_parameters(named: list, units: list[tuple[str, list, bool]]) -> list[int]:
    """The unit of each parameter of `named` ((name, parameter) in model order): the first unit whose modules
    hold it (a tied parameter is the embedding's)."""
    owner: dict[int, int] = {}
    for index, (_, modules, _) in enumerate(units):
        for module in modules:
            for p in module.parameters():
                owner.setdefault(id(p), index)
    missing = [n for n, p in named if id(p) not in owner]
    if missing:
        raise ValueError(f"parameters in no unit: {missing[:3]}")
    return [owner[id(p)] for _, p in named]


@dataclass
class UnitLayouts:
    """Stage 3's flat layouts: the trainable parameters' (the optimizer's index space) and the frozen ones', one
    bucket per unit that has such parameters; `buckets[kind][unit]`: that bucket (kind 0 trainable, 1 frozen)."""
    indices: tuple[list[int], list[int]]  # the model-order positions of the trainable and the frozen parameters
    layouts: tuple[FlatLayout, FlatLayout]
    buckets: tuple[dict, dict]

    def unit_buckets(self, unit: int) -> tuple:
        """The unit's trainable and frozen buckets (None where it has no such parameters)."""
        return tuple(buckets.get(unit) for buckets in self.buckets)

    def positions(self) -> dict[int, tuple[int, int]]:
        """Model-order position -> (kind, its index among that kind's parameters)."""
        return {i: (kind, local) for kind in (0, 1) for local, i in enumerate(self.indices[kind])}


def own_widths(buckets) -> tuple[int, int]:
    """This rank's elements of a unit's (trainable, frozen) buckets."""
    return tuple(b.shard_numel if b else 0 for b in buckets)


def unit_layouts(numels: list[int], trainable: list[bool], unit_of: list[int], world: int, rank: int) -> UnitLayouts:
    """The layouts of parameters of sizes `numels` (model order), trainable or not, in units `unit_of`."""
    indices = ([i for i, t in enumerate(trainable) if t], [i for i, t in enumerate(trainable) if not t])
    layouts, buckets = [], []
    for kind in (0, 1):
        bounds, bucket_of_unit = unit_bounds([unit_of[i] for i in indices[kind]])
        layout = FlatLayout([numels[i] for i in indices[kind]], world, rank, bounds=bounds)
        layouts.append(layout)
        buckets.append({unit: layout.buckets[b] for unit, b in bucket_of_unit.items()})
    return UnitLayouts(indices, tuple(layouts), tuple(buckets))
